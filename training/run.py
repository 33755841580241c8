"""`TrainingRun`, the bookkeeping of one run that both trainers share: experiment folder, step counter, data
position, logs, checkpoints, resume and sample grids."""
import contextlib
import itertools
import json
import signal
import threading
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from training.distributed import all_gather_objects, from_main_process
from training.guard import NonFiniteGuard, NonFiniteStop
from training.sample_grid import save_sample_grid
from training.tracking import create_logger
from utils.errors import UserError
from utils.files import atomic_write
from weights.checkpoint import (
    NonFiniteWeights,
    assert_finite,
    atomic_save,
    capture_rng_state,
    checkpoint_file,
    load_file,
    load_state_dict_strict,
    prune_checkpoints,
    remove_stale_temporaries,
    restore_rng_state,
)


def reduce_logs(logs, accelerator):
    """Average scalar metrics over processes with one collective; returns floats."""
    names = list(logs)
    values = torch.stack([torch.as_tensor(logs[n], dtype=torch.float32, device=accelerator.device).detach().reshape(())
                          for n in names])
    values = accelerator.reduce(values, "mean")
    return dict(zip(names, values.tolist()))


def main_losses(logs, keys=("sit_loss", "denoising_loss", "proj_loss", "vae_loss", "vae_align_loss", "d_loss")):
    """The main losses of logged metrics as 'name=value, ...'."""
    return ", ".join(f"{key}={logs[key]:.4f}" for key in keys if key in logs)


EVAL_FILE = "eval.jsonl"  # one line of numbers per evaluation during training


class TrainingRun:
    """One run's bookkeeping, the same for both trainers: EXP = output_dir/exp_name with its args and log.txt,
    trackers, the step counter and data position, the non-finite guard, checkpoints and sample grids.

    Every process makes one and calls each method at the same point of the loop (process 0 writes). Nothing is
    written before `open`, so a run refused by its checks (or by `resume`) leaves no trace.
    """

    def __init__(self, accelerator, exp_dir, *, config, local_batch_size, max_train_steps, max_nonfinite_steps,
                 modules, optimizers, keep_last_checkpoints=0, checkpoint_extra=None):
        self.accelerator = accelerator
        # What a checkpoint holds: key -> plain module (model, ema, vae, discriminator) and key -> optimizer (opt,
        # opt_vae, opt_disc) in the published layout, and the trainer's own extra entries.
        self.modules, self.optimizers, self.checkpoint_extra = modules, optimizers, checkpoint_extra or {}
        self.keep_last_checkpoints = keep_last_checkpoints
        self.exp_dir = Path(exp_dir)
        self.config = config  # the run's flags, written to EXP and into every checkpoint ("args")
        self.data_layout = [accelerator.num_processes, local_batch_size]
        self.max_train_steps = max_train_steps
        self.logger = create_logger(None, accelerator.is_main_process)  # the console until open()
        self.guard = NonFiniteGuard(max_nonfinite_steps, self.logger)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.resumed_from = None
        self.window, self.window_steps = {}, 0  # metrics summed on the device since the last log
        self.last_logs, self.logged_step = {}, None
        self.progress_bar = None
        self.checkpointed_step, self.stop_reason = None, None
        self.failure = None  # the NonFiniteStop that ended the run
        self.stop_signal = None  # the name of the signal that asked the run to stop
        self.reached_end = False  # the run did its steps or epochs (not stopped by a signal or non-finite steps)

    def open(self, project):
        """Create EXP: args.json for a new run (a resumed one keeps it and adds args-resume-STEP[-N].json), log.txt,
        trackers; delete temporary files that killed checkpoint writes left behind."""
        if self.accelerator.is_main_process:
            checkpoints = self.exp_dir / "checkpoints"
            checkpoints.mkdir(parents=True, exist_ok=True)
            args_file = self.exp_dir / "args.json"
            if self.resumed_from is not None and args_file.is_file():  # every resume keeps its own record
                names = (f"args-resume-{self.step:07d}{f'-{n}' if n > 1 else ''}.json" for n in itertools.count(1))
                args_file = next(self.exp_dir / name for name in names if not (self.exp_dir / name).exists())
            with atomic_write(args_file) as tmp:
                tmp.write_text(json.dumps(vars(self.config), indent=4))
            stale = remove_stale_temporaries(checkpoints)
        self.accelerator.wait_for_everyone()
        self.logger = create_logger(self.exp_dir, self.accelerator.is_main_process)
        self.guard.logger = self.logger
        self.logger.info(f"Experiment directory: {self.exp_dir}")
        if self.accelerator.is_main_process and stale:
            self.logger.info(f"Deleted {len(stale)} temporary files of interrupted checkpoint writes")
        if self.resumed_from is not None:
            self.logger.info(f"Resumed from {self.resumed_from} at step {self.step}")
        # the flags as hyperparameters; TensorBoard takes no lists (--eval-metrics): joined with commas
        config = {name: ",".join(map(str, value)) if isinstance(value, list) else value
                  for name, value in vars(self.config).items()}
        self.accelerator.init_trackers(project, config=config, init_kwargs={"wandb": {"name": self.config.exp_name}})

    def batches(self, loader, sampler, epochs):
        """The run's batches from its data position on, until max_train_steps steps or `epochs` epochs are done, or
        a step ends the run (a run of non-finite steps, or SIGINT / SIGTERM: see end_step)."""
        self.progress_bar = tqdm(total=self.max_train_steps, initial=self.step, desc="Steps",
                                 disable=not self.accelerator.is_local_main_process)
        with self._stop_on_signals():
            for epoch in range(self.epoch, epochs):
                start = self.batch_in_epoch if epoch == self.epoch else 0
                sampler.set_epoch(epoch, start_index=start * loader.batch_size)
                for index, batch in enumerate(loader, start=start):
                    if self.stop_reason is not None:
                        return
                    if self.step >= self.max_train_steps:
                        self.stop_reason = f"reached --max-train-steps {self.max_train_steps}"
                        self.reached_end = True
                        return
                    self.epoch, self.batch_in_epoch = epoch, index + 1
                    yield batch
            self.stop_reason = f"completed --epochs {epochs}"
            self.reached_end = True

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """While training, SIGINT (Ctrl-C) and SIGTERM ask the run to stop at the end of a step, with a checkpoint;
        the same signal again stops it at once (KeyboardInterrupt)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            name = signal.Signals(signum).name
            if self.stop_signal == name:
                raise KeyboardInterrupt
            self.stop_signal = self.stop_signal or name
            self.logger.warning(f"{name}: the run stops at the end of a step, with a checkpoint ({name} again: at "
                                "once, without one)")

        previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _stop_requested(self, log_every):
        """Whether a signal asked the run to stop, agreed by every process: at once with one process; with several,
        at logging steps (one collective there, where the host reads the logs anyway)."""
        if self.accelerator.num_processes == 1:
            return self.stop_signal is not None
        if self.step % log_every:
            return False
        asked = torch.tensor([float(self.stop_signal is not None)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(asked, "sum").item())

    def end_step(self, logs, *, log_every, checkpoint_every):
        """Count a finished optimization step and add its metrics to the logging window, on the device; log the
        window every log_every steps and write a checkpoint every checkpoint_every steps. Returns False (nothing
        counted) while gradients accumulate."""
        if not self.accelerator.sync_gradients:
            return False
        self.step += 1
        self.guard.end_step()
        for name, value in logs.items():
            if value is not None:
                self.window[name] = self.window.get(name, 0.0) + value.detach().float()
        self.window_steps += 1
        self.progress_bar.update(1)
        try:
            if self.step % log_every == 0:
                self.log()
            if self.step % checkpoint_every == 0:
                self.save_checkpoint()
        except NonFiniteStop as stop:  # finish() still checkpoints this step, then reports it
            self._fail(stop)
        if self.stop_reason is None and self._stop_requested(log_every):
            self.stop_reason = f"stopped by {self.stop_signal or 'a signal to another process'}; continue with " \
                               "--resume-latest"
        return True

    def _fail(self, stop):
        """Record the NonFiniteStop that ends the run."""
        self.failure, self.stop_reason = stop, "too many non-finite steps"

    def log(self):
        """Average the window's metrics over its steps and the processes (one collective, one host read), send them
        to the progress bar and the trackers; the guard reads its counters and stops a run of non-finite steps."""
        self.guard.check(self.step)
        logs = reduce_logs({name: total / self.window_steps for name, total in self.window.items()}, self.accelerator)
        self.window, self.window_steps = {}, 0
        logs.update(epoch=self.epoch, skipped_updates=self.guard.skipped)
        self.progress_bar.set_postfix({k: f"{logs[k]:.4f}" for k in ("sit_loss", "proj_loss", "vae_loss") if k in logs})
        self.accelerator.log(logs, step=self.step)
        self.last_logs, self.logged_step = logs, self.step

    def save_checkpoint(self, check_guard=True):
        """Write EXP/checkpoints/%07d.pt in the published layout plus what an exact resume needs.

        The modules and optimizers, and beside them: args, steps, rng (per process), data position, guard, scaler
        and the extra entries. Non-finite weights are refused. keep_last_checkpoints > 0 deletes all but the newest
        that many checkpoints. check_guard=False writes it after the guard stopped the run.
        """
        if check_guard:
            self.guard.check(self.step)
        path = checkpoint_file(self.exp_dir, self.step)
        checkpoint = {key: module.state_dict() for key, module in self.modules.items()}
        assert_finite(checkpoint, path)  # on every process (their weights are the same), so all stop together
        rng_states = all_gather_objects(capture_rng_state())
        if self.accelerator.is_main_process:
            checkpoint.update({key: opt.state_dict() for key, opt in self.optimizers.items()})
            checkpoint.update(args=self.config, steps=self.step, rng=rng_states, guard=self.guard.state_dict(),
                              data={"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                                    "layout": self.data_layout})
            if self.accelerator.scaler is not None:
                checkpoint["scaler"] = self.accelerator.scaler.state_dict()
            checkpoint.update(self.checkpoint_extra)
            atomic_save(checkpoint, path)
            prune_checkpoints(self.exp_dir, self.keep_last_checkpoints)
        self.accelerator.wait_for_everyone()
        self.checkpointed_step = self.step
        losses = f"losses logged at step {self.logged_step}: {main_losses(self.last_logs)}" if self.last_logs \
            else "no losses logged yet"
        self.logger.info(f"Saved checkpoint to {path} at step {self.step}; {losses}")
        return path

    def resume(self, path, *, batches_per_epoch, seed, gradient_accumulation_steps):
        """Load a checkpoint of save_checkpoint (or of the published code) into the run; returns the checkpoint.
        A checkpoint that lacks a module or does not fit it raises UserError (before open(): nothing written).

        Without random and data state for this run's layout (published checkpoints, or another process count or
        batch size) the run continues at the data position its step count implies, with random streams seeded
        from the step: it goes on, but does not repeat an uninterrupted run exactly.
        """
        checkpoint = load_file(path)
        missing = [key for key in (*self.modules, *self.optimizers, "steps") if key not in checkpoint]
        if missing:
            raise UserError(f"{path} has no {', '.join(missing)}: it is not a checkpoint of this trainer")
        for key, module in self.modules.items():
            load_state_dict_strict(module, checkpoint[key], f"{path} [{key}]")
        for key, opt in self.optimizers.items():
            opt.load_state_dict(checkpoint[key])
        if "guard" in checkpoint:
            self.guard.load_state_dict(checkpoint["guard"])
        if "scaler" in checkpoint and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(checkpoint["scaler"])
        self.step, data = checkpoint["steps"], checkpoint.get("data")
        if data is not None and data.get("layout") == self.data_layout and "rng" in checkpoint:
            restore_rng_state(checkpoint["rng"][self.accelerator.process_index])
            self.epoch, self.batch_in_epoch = data["epoch"], data["batch_in_epoch"]
        else:
            processes, local_batch = self.data_layout
            warnings.warn(f"{path} holds no random and data state for {processes} processes of batch "
                          f"{local_batch}; continuing from its step count")
            torch.manual_seed(seed + self.accelerator.process_index + self.step * processes)
            micro_batches = self.step * gradient_accumulation_steps
            self.epoch, self.batch_in_epoch = divmod(micro_batches, batches_per_epoch)
        self.resumed_from, self.checkpointed_step = path, self.step
        return checkpoint

    def evaluation_due(self, every, *, at_end=False):
        """Whether to evaluate at this step: every `every` steps (0: never) and at the end of a run, unless
        EXP/eval.jsonl already holds this step (a resumed run); the same answer on every process."""
        if not every or self.step == 0 or not (at_end or self.step % every == 0):
            return False  # the same on every process: no collective
        due = self.step not in self._evaluated_steps() if self.accelerator.is_main_process else None
        return from_main_process(due)

    def _evaluated_steps(self):
        """The steps EXP/eval.jsonl holds numbers of."""
        path = self.exp_dir / EVAL_FILE
        if not path.is_file():
            return set()
        return {json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()}

    def log_evaluation(self, results, seconds):
        """Record the evaluation of this step (results: {name: number} on process 0): a line appended to
        EXP/eval.jsonl with the step and the seconds it took, the trackers (eval/NAME curves) and the log."""
        if self.accelerator.is_main_process:
            record = {"step": self.step, **results, "seconds": round(seconds, 3)}
            with open(self.exp_dir / EVAL_FILE, "a") as file:
                file.write(json.dumps(record) + "\n")
            self.accelerator.log({f"eval/{name}": value for name, value in results.items()}, step=self.step)
            numbers = ", ".join(f"{name}={value:.4f}" if isinstance(value, float) else f"{name}={value}"
                                for name, value in results.items())
            self.logger.info(f"Evaluation at step {self.step} ({seconds:.1f} s): {numbers}")
        self.accelerator.wait_for_everyone()

    def save_samples(self, images):
        """Write a sample grid (images in [0, 1]) as EXP/samples/%07d.png and send it to the trackers."""
        path = self.exp_dir / "samples" / f"{self.step:07d}.png"
        if self.accelerator.is_main_process:
            save_sample_grid(self.accelerator, images, path, self.step)
            self.logger.info(f"Saved EMA sample grid to {path}")
        self.accelerator.wait_for_everyone()
        return path

    def finish(self):
        """End the run: a checkpoint of its last step unless there is one, a line saying why and how it ended, the
        trackers closed. A run ended by non-finite steps then raises its NonFiniteStop."""
        if self.failure is None:
            try:
                self.guard.check(self.step)
            except NonFiniteStop as stop:
                self._fail(stop)
        if self.step > 0 and self.checkpointed_step != self.step:
            try:
                self.save_checkpoint(check_guard=self.failure is None)
            except NonFiniteWeights as refused:
                self.logger.warning(f"No checkpoint of step {self.step}: {refused}")
        self.accelerator.wait_for_everyone()
        self.logger.info(f"Done ({self.stop_reason}): {self.step} steps, {self.guard.skipped} skipped updates")
        self.accelerator.end_training()
        if self.failure is not None:
            raise self.failure
