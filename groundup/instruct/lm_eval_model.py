"""Any model of the pipeline as an lm-eval ``LM``: log-likelihoods computed with the model itself.

Imports lm-eval at module level; ``groundup.instruct.mc_eval`` imports this module only after checking that
the ``eval`` extra is installed. One adapter serves our GPT and LitGPT checkpoints alike (both are
``groundup.instruct.inference.CausalLM``), so no conversion to a Hugging Face checkpoint is needed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from groundup.instruct.inference import CausalLM, Sampling

TokenRequest = tuple[Any, list[int], list[int]]  # (cache key, context ids, continuation ids)


class CausalLMAdapter(TemplateLM):
    def __init__(self, model: CausalLM, batch_size: int = 4) -> None:
        super().__init__()
        self.model = model
        self.batch_size = batch_size

    @property
    def eot_token_id(self) -> int:
        return self.model.eos_id

    @property
    def max_length(self) -> int:
        return self.model.context_length

    @property
    def tokenizer_name(self) -> str:
        return self.model.model_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.model.encode(string)

    def _loglikelihood_tokens(
        self, requests: list[TokenRequest], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation, and whether it is the greedy choice.

        The model sees ``(context + continuation)[:-1]`` (cut from the left to the context window); rows of
        a batch are padded on the right, which a causal model never attends to. Longest rows go first so a
        batch holds similar lengths.
        """
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        bar = tqdm(total=len(requests), desc="Scoring choices", disable=disable_tqdm or None)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            rows = [(requests[i][1] + requests[i][2])[-(self.max_length + 1) :][:-1] for i in batch]
            width = max(len(row) for row in rows)
            idx = torch.tensor(
                [row + [self.eot_token_id] * (width - len(row)) for row in rows], device=self.model.device
            )
            log_probs = F.log_softmax(self.model.logits(idx).float(), dim=-1)
            for row_index, (i, row) in enumerate(zip(batch, rows, strict=True)):
                continuation = requests[i][2]
                positions = slice(len(row) - len(continuation), len(row))
                row_log_probs = log_probs[row_index, positions]
                target = torch.tensor(continuation, device=row_log_probs.device)
                total = row_log_probs.gather(-1, target.unsqueeze(-1)).sum().item()
                greedy = bool((row_log_probs.argmax(dim=-1) == target).all())
                results[i] = (total, greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], (total, greedy))
            bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts (perplexity tasks), window by window."""
        totals = []
        for (text,) in (request.args for request in requests):
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            pieces = [(None, *make_disjoint_window(window)) for window in windows]
            totals.append(sum(score for score, _ in self._loglikelihood_tokens(pieces, disable_tqdm=True)))
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first stop string (generative tasks)."""
        outputs = []
        for context, gen_kwargs in tqdm(
            [r.args for r in requests], desc="Generating", disable=disable_tqdm or None
        ):
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sampling = Sampling(
                max_new_tokens=int(gen_kwargs.get("max_gen_toks", 256)),
                temperature=float(gen_kwargs.get("temperature", 0.0) or 0.0),
            )
            text = self.model.complete([context], sampling)[0]
            cuts = [text.find(stop) for stop in until if stop and stop in text]
            outputs.append(text[: min(cuts)] if cuts else text)
        return outputs
