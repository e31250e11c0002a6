"""A `transformers.TrainerCallback` that takes `Trainer`'s checkpoint saves over with a Checkpointer.

With `FastAdapterCallback()` in `callbacks=[...]`, every save the Trainer would make (its
`save_strategy` / `save_steps`) is made by fastadapter instead: the adapter is snapshotted and written
in the background as `output_dir/checkpoint-<step>/` with the files `save_pretrained` writes, plus
`trainer_state.json`, so that

* the directory loads with `PeftModel.from_pretrained(base, path)`, and
* `trainer.train(resume_from_checkpoint=path)` (or `=True`) resumes at that step with those weights.

The checkpoints are optimizer-free: the optimizer, scheduler, scaler and RNG states are not saved
(the Trainer starts them afresh on resume, as it does when those files are missing). Only rank 0
writes. `save_total_limit` becomes `keep_last`. Not supported (refused at start):
`load_best_model_at_end`, which needs the Trainer's own best-checkpoint bookkeeping.

Requires transformers (an optional dependency of fastadapter) and a model with adapters (a
`peft.PeftModel`; models fastadapter injected work too, but Trainer can only resume PEFT ones).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..checkpoint import Checkpointer

__all__ = ["FastAdapterCallback"]

TRAINER_STATE_NAME = "trainer_state.json"


class FastAdapterCallback(TrainerCallback):
    """Save the Trainer's checkpoints through a `fastadapter.Checkpointer`.

    `checkpointer`: use this one (its root should be the Trainer's `output_dir` for resuming with
    `resume_from_checkpoint=True`); by default one is made on `args.output_dir` with
    `keep_last=args.save_total_limit` and the given `async_save` / `fsync`.
    """

    def __init__(
        self, checkpointer: Checkpointer | None = None, *, async_save: bool = True, fsync: bool = True
    ) -> None:
        self.checkpointer = checkpointer
        self._async_save = async_save
        self._fsync = fsync

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if args.load_best_model_at_end:
            raise ValueError(
                "FastAdapterCallback does not support load_best_model_at_end: the Trainer tracks the best "
                "checkpoint only for checkpoints it saves itself"
            )
        if self.checkpointer is None:
            self.checkpointer = Checkpointer(
                args.output_dir or "trainer_output",  # Trainer's own default when output_dir is None
                keep_last=args.save_total_limit or None,
                async_save=self._async_save,
                fsync=self._fsync,
                rank=args.process_index,
                world_size=args.world_size,
            )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._maybe_save(state, control, kwargs.get("model"))

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._maybe_save(state, control, kwargs.get("model"))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Training is over: the last checkpoint must be on disk before train() returns.
        if self.checkpointer is not None:
            self.checkpointer.wait()

    def _maybe_save(self, state: TrainerState, control: TrainerControl, model: Any) -> None:
        # The Trainer's DefaultFlowCallback (which runs before us) decided this step saves. We save and
        # clear the flag, so the Trainer does not write the same checkpoint again, synchronously.
        if not control.should_save or model is None or self.checkpointer is None:
            return
        control.should_save = False
        # What Trainer._save_checkpoint records for its own control object, so resuming restores it.
        callbacks: Any = state.stateful_callbacks  # a dict once TrainerState.__post_init__ ran
        callbacks["TrainerControl"] = control.state()
        trainer_state = json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n"
        self.checkpointer.save(
            state.global_step,
            model,
            extra={"global_step": state.global_step, "epoch": state.epoch},
            files={TRAINER_STATE_NAME: trainer_state.encode()},
        )
