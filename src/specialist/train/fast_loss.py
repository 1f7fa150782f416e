"""The SFT trainer whose loss is `specialist.logits.completion_loss`: logits only where there are labels, and never
all of them at once (see that module for how, and what it saves)."""

from __future__ import annotations

from trl import SFTTrainer

from specialist.logits import completion_loss
from specialist.train.checkpoints import DurableCheckpoints


class CompletionOnlySFTTrainer(DurableCheckpoints, SFTTrainer):
    """SFTTrainer whose loss projects only labelled positions onto the vocabulary (and whose checkpoints survive
    a kill at any instant: see `checkpoints.DurableCheckpoints`).

    Trade-off: TRL's per-token entropy and accuracy diagnostics (full-vocabulary work on every step) are not
    computed; loss, validation loss and everything else the Trainer does are unchanged.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = completion_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss
