"""ftlab: an LLM fine-tuning research toolkit.

The SFT building blocks (seed 002) are importable from the top level:

    from ftlab import tokenize_prompt_and_output, get_response_log_probs, sft_microbatch_train_step

and the DPO loss: `from ftlab import dpo_loss` (training: `ftlab.train.dpo.run_dpo`, or train.method: dpo).
"""
from ftlab.data.sft import tokenize_prompt_and_output
from ftlab.evaluate import log_generations
from ftlab.losses import (compute_entropy, dpo_loss, get_response_log_probs, masked_mean, masked_normalize,
                          sft_microbatch_train_step)
from ftlab.tasks.gsm8k import parse_gsm8k_response

__version__ = "0.1.0"

__all__ = [
    "tokenize_prompt_and_output", "compute_entropy", "get_response_log_probs", "masked_normalize",
    "masked_mean", "sft_microbatch_train_step", "dpo_loss", "log_generations", "parse_gsm8k_response",
    "__version__",
]
