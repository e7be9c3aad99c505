"""The tuning recipe: `Tuner(args).run()` as explicit setup steps, each taking and returning what it needs.

    check arguments, resolve --resume-from-checkpoint          (before anything is loaded)
    accelerator        Accelerator + seed
    load               the checkpoint through `loading.load_checkpoint` (fp32 master weights), its save dtype
    data               encoder, records (subset, bad records), subset.json / bad_records.jsonl
    freeze             the trainable set, digests of everything frozen, gradient checkpointing
    loader             dataset (the method's per-image side inputs from its processor), sampler, collator
    optimizer          AdamW + scheduler, everything through `accelerator.prepare`
    resume             the saved state, checked against this run's shape
    loop               optimizer steps with logging, progress and periodic states
    export             `export.export_tuned`: projector.safetensors + model/, verified; summary.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..methods import for_model_type
from .common import TuningError
from .export import PROJECTOR_FILE, export_tuned
from .model_setup import load_for_tuning
from .state import (
    RunLog,
    _check_saved_weights,
    _keep_trainable_weights,
    _read_state,
    configure_trainable,
    resolve_resume,
    save_training_state,
    tensor_digests,
)


UNREADABLE_FILE = "unreadable_images.jsonl"


@dataclass
class TrainingData:
    """What the data step found: the records trained on, those skipped, their fingerprint."""

    encoder: Any
    samples: list
    bad: list
    fingerprint: str


@dataclass
class Frozen:
    """The trainable parameter names and the digests of every frozen one (main process only, else None)."""

    trainable_names: list
    frozen_before: dict | None


@dataclass
class Prepared:
    """Model, optimizer, loader and scheduler after `accelerator.prepare`, and the run's length."""

    model: Any
    optimizer: Any
    loader: Any
    scheduler: Any
    sampler: Any
    unreadable_log: Path
    batches_per_epoch: int
    total_steps: int


@dataclass
class Position:
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


# The run -------------------------------------------------------------------------------------------------------


class Tuner:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.output_dir = Path(args.output_dir)

    def say(self, message: str) -> None:
        if self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()

    # setup ----------------------------------------------------------------------------------------------
    # the recipe ---------------------------------------------------------------------------------------
    def run(self) -> int:
        from .train import check_arguments

        check_arguments(self.args)
        resume_dir = resolve_resume(self.args.resume_from_checkpoint, self.output_dir)
        accelerator = self._accelerator()
        started = time.time()
        model, processor = self._load()
        data = self._data(model.config, processor)
        frozen = self._freeze(model)
        prepared = self._prepare(model, processor, data, resume_dir)
        run_shape = self._run_shape(data, prepared)
        position = self._resume(resume_dir, prepared, run_shape)
        log = RunLog(self.output_dir / "log.jsonl", accelerator.is_main_process, resume=resume_dir is not None)
        log.write({"event": "resume" if resume_dir else "start", "step": position.global_step,
                   "total_steps": prepared.total_steps, "records": len(data.samples),
                   "batches_per_epoch": prepared.batches_per_epoch, "args": vars(self.args) | {"handler": None}})
        self.say(f"training: {prepared.total_steps} optimizer step(s), {prepared.batches_per_epoch} batch(es) per "
                 f"epoch and process, {accelerator.num_processes} process(es), accumulation "
                 f"{self.args.gradient_accumulation_steps}, precision {accelerator.mixed_precision}")
        last_loss = self._loop(prepared, position, run_shape, log, started)
        self._finish(prepared, processor, data, frozen, position, last_loss, log, started)
        return 0

    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.accelerator = Accelerator(
            mixed_precision=self.args.mixed_precision,
            gradient_accumulation_steps=self.args.gradient_accumulation_steps,
            step_scheduler_with_optimizer=False,
        )
        set_seed(self.args.seed)
        return self.accelerator

    def _load(self):
        """The checkpoint in fp32; refused under DeepSpeed half precision when that would round frozen weights."""
        import torch
        from accelerate.utils import DistributedType

        accelerator = self.accelerator
        model, processor, self.save_dtype = load_for_tuning(self.args)
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        if deepspeed and accelerator.mixed_precision in ("bf16", "fp16"):
            # DeepSpeed keeps the module itself in half precision: frozen weights stay exact only if the input
            # checkpoint was stored in that precision.
            half = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16
            if self.save_dtype != half:
                raise TuningError(
                    f"DeepSpeed with {accelerator.mixed_precision} would round the frozen weights of this "
                    f"{str(self.save_dtype).replace('torch.', '')} checkpoint; convert it with --dtype "
                    f"{str(half).replace('torch.', '')} first (or train without DeepSpeed)")
        return model, processor

    def _data(self, config, processor) -> TrainingData:
        from .data import ConversationEncoder, fingerprint, load_samples

        args = self.args
        encoder = ConversationEncoder(processor, config.image_seq_length, config.image_token_id,
                                      args.prompt_format, args.max_length)
        samples, bad = load_samples(
            args.data, args.image_folder, fraction=args.fraction, max_samples=args.max_samples, seed=args.seed,
            skip_bad_records=args.skip_bad_records, skip_text_only=args.skip_text_only,
            decode_images=args.full_image_check, encoder=encoder,
        )
        data = TrainingData(encoder, samples, bad, fingerprint(samples))
        self.say(f"data: {len(samples)} record(s) from {args.data} ({encoder.prompt_format} prompts)"
                 + (f", {len(bad)} bad record(s) skipped" if bad else ""))
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "subset.json").write_text(json.dumps(
                {"data": str(args.data), "fraction": args.fraction, "max_samples": args.max_samples,
                 "seed": args.seed, "fingerprint": data.fingerprint,
                 "records": [{"index": s.index, "id": s.record_id} for s in samples]}) + "\n")
            with open(self.output_dir / "bad_records.jsonl", "w", encoding="utf-8") as handle:
                for item in bad:
                    handle.write(json.dumps({"index": item.index, "id": item.record_id, "line": item.line,
                                             "reason": item.reason}) + "\n")
        return data

    def _freeze(self, model) -> Frozen:
        args = self.args
        trainable_names = configure_trainable(model, args.trainable)
        frozen_names = {name for name, _ in model.named_parameters()} - set(trainable_names)
        frozen_before = None
        if self.accelerator.is_main_process:
            frozen_before = tensor_digests(
                ((n, p) for n, p in model.named_parameters() if n in frozen_names), self.save_dtype)
        trainable_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total_count = sum(p.numel() for p in model.parameters())
        self.say(f"model: {model.config.model_type} from {args.model}; training {args.trainable} "
                 f"({trainable_count:,} of {total_count:,} parameters), everything else frozen")
        model.config.text_config.use_cache = False
        if args.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return Frozen(trainable_names, frozen_before)

    def _prepare(self, model, processor, data: TrainingData, resume_dir) -> Prepared:
        """Dataset, loader, optimizer and scheduler, through `accelerator.prepare`."""
        import torch
        from accelerate.utils import DistributedType
        from transformers import get_scheduler

        from .data import EpochSampler, InstructionCollator, InstructionDataset, read_unreadable_log

        args, accelerator, config = self.args, self.accelerator, model.config
        unreadable_log = self.output_dir / UNREADABLE_FILE
        if accelerator.is_main_process and resume_dir is None and unreadable_log.exists():
            unreadable_log.unlink()  # a fresh run finds its own
        accelerator.wait_for_everyone()
        # The method's per-image side inputs (TRIM's CLIP rows of each question) come from its processor.
        side_inputs = for_model_type(config.model_type).side_inputs
        dataset = InstructionDataset(
            data.samples, data.encoder, processor, side_inputs=side_inputs, image_aspect_ratio=args.image_aspect_ratio,
            skip_unreadable=args.skip_bad_records, unreadable_log=unreadable_log,
            known_unreadable=read_unreadable_log(unreadable_log) if resume_dir else (),
        )
        sampler = EpochSampler(len(dataset), args.seed)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.per_device_batch_size, sampler=sampler, num_workers=args.num_workers,
            collate_fn=InstructionCollator(config.pad_token_id if config.pad_token_id is not None else 0),
        )
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                      weight_decay=args.weight_decay)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        batches_per_epoch = len(loader)
        steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
        total_steps = args.max_steps or steps_per_epoch * args.num_epochs
        scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=int(args.warmup_ratio * total_steps),
                                  num_training_steps=total_steps)
        scheduler = accelerator.prepare(scheduler)
        if accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP,
                                                DistributedType.MEGATRON_LM):
            accelerator.register_save_state_pre_hook(_keep_trainable_weights)
        return Prepared(model, optimizer, loader, scheduler, sampler, unreadable_log, batches_per_epoch, total_steps)

    def _run_shape(self, data: TrainingData, prepared: Prepared) -> dict:
        """What a resumed run must share with the saved one."""
        args = self.args
        return {"data_fingerprint": data.fingerprint, "num_processes": self.accelerator.num_processes,
                "per_device_batch_size": args.per_device_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps, "seed": args.seed,
                "trainable": args.trainable, "total_steps": prepared.total_steps}

    def _resume(self, resume_dir, prepared: Prepared, run_shape: dict) -> Position:
        from accelerate.utils import DistributedType

        if resume_dir is None:
            return Position()
        accelerator = self.accelerator
        saved = _read_state(resume_dir)
        for key, value in run_shape.items():
            if saved["run"].get(key) != value:
                raise TuningError(
                    f"cannot resume from {resume_dir}: {key} was {saved['run'].get(key)!r}, now {value!r} "
                    "(resume with the same data, subset, seed, batch shape, processes and steps)")
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            accelerator.load_state(str(resume_dir), load_module_strict=False)
        else:
            _check_saved_weights(resume_dir, accelerator, prepared.model)
            accelerator.load_state(str(resume_dir), strict=False)
        position = Position(saved["global_step"], saved["epoch"], saved["batch_in_epoch"])
        self.say(f"resumed from {resume_dir} at step {position.global_step} (epoch {position.epoch}, batch "
                 f"{position.batch_in_epoch})")
        return position

    def _loop(self, prepared: Prepared, position: Position, run_shape: dict, log: RunLog, started: float):
        """Optimizer steps until `total_steps`; updates `position`, returns the last logged loss."""
        import torch
        from tqdm.auto import tqdm

        args, accelerator = self.args, self.accelerator
        model, optimizer, scheduler, loader = prepared.model, prepared.optimizer, prepared.scheduler, prepared.loader
        batches_per_epoch, total_steps = prepared.batches_per_epoch, prepared.total_steps
        unwrapped = accelerator.unwrap_model(model)
        model.train()
        # Every frozen tower (the vision tower, a method's text tower) stays in eval mode.
        for name, child in unwrapped.model.named_children():
            if name not in ("multi_modal_projector", "language_model"):
                child.eval()
        projector_params = list(unwrapped.model.multi_modal_projector.parameters())
        trainable_params = [p for p in model.parameters() if p.requires_grad]
        progress = tqdm(total=total_steps, initial=position.global_step, desc="tuning", unit="step",
                        disable=args.no_progress or not accelerator.is_local_main_process, file=sys.stderr)
        window_losses, last_loss, grad_norm = [], None, None
        global_step, epoch, batch_in_epoch = position.global_step, position.epoch, position.batch_in_epoch
        while global_step < total_steps:
            batches = accelerator.skip_first_batches(loader, batch_in_epoch) if batch_in_epoch else loader
            # accelerate's loaders pass their own epoch counter to the sampler when iterated; align it with ours
            # (a resumed run's fresh loader would otherwise restart from epoch 0's order).
            if hasattr(batches, "set_epoch"):
                batches.set_epoch(epoch)
            prepared.sampler.set_epoch(epoch)
            finished_epoch = True
            for batch in batches:
                with accelerator.accumulate(model):
                    output = model(**batch)
                    loss = output.loss
                    if "pixel_values" not in batch:
                        # No image: the projector gets no gradient. A zero term keeps every process's gradient
                        # set identical (DDP) and backward possible when only the projector trains.
                        loss = loss + 0.0 * sum(p.sum() for p in projector_params)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(trainable_params, args.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad()
                batch_in_epoch += 1
                window_losses.append(loss.detach().float())
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                mean_loss = accelerator.reduce(torch.stack(window_losses).mean(), reduction="mean").item()
                window_losses = []
                last_loss = mean_loss
                record = {"step": global_step, "epoch": round(epoch + batch_in_epoch / batches_per_epoch, 4),
                          "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                          "grad_norm": None if grad_norm is None else float(grad_norm),
                          "elapsed_s": round(time.time() - started, 2)}
                log.write(record)
                progress.update(1)
                progress.set_postfix(loss=f"{mean_loss:.4f}")
                if global_step % args.logging_steps == 0 or global_step == total_steps:
                    self.say(f"step {global_step}/{total_steps} loss {mean_loss:.4f} lr {record['lr']:.3g}")
                if args.save_steps and global_step % args.save_steps == 0:
                    directory = save_training_state(accelerator, self.output_dir, args.save_total_limit,
                                                    global_step, epoch, batch_in_epoch, batches_per_epoch,
                                                    run_shape)
                    self.say(f"saved training state {directory}")
                if global_step >= total_steps:
                    finished_epoch = batch_in_epoch >= batches_per_epoch
                    break
            if finished_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
        progress.close()
        position.global_step, position.epoch, position.batch_in_epoch = global_step, epoch, batch_in_epoch
        return last_loss

    def _finish(self, prepared: Prepared, processor, data: TrainingData, frozen: Frozen, position: Position,
                last_loss, log: RunLog, started: float) -> None:
        """Export on the main process (projector, checkpoint, summary.json), then end the run everywhere."""
        from .data import read_unreadable_log

        args, accelerator = self.args, self.accelerator
        main_process = accelerator.is_main_process
        accelerator.wait_for_everyone()
        state_dict = accelerator.get_state_dict(prepared.model)
        summary = None
        if main_process:
            unwrapped = accelerator.unwrap_model(prepared.model)
            summary = export_tuned(self.output_dir, args, self.save_dtype, unwrapped, processor, state_dict,
                                   frozen.trainable_names, frozen.frozen_before)
            unreadable = len(read_unreadable_log(prepared.unreadable_log))
            summary.update({"steps": position.global_step, "final_loss": last_loss, "records": len(data.samples),
                            "bad_records_skipped": len(data.bad), "unreadable_images_skipped": unreadable,
                            "elapsed_s": round(time.time() - started, 2)})
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            log.write({"event": "done", **summary})
        log.close()
        accelerator.wait_for_everyone()
        accelerator.end_training()
        if main_process:
            self.say(f"saved {self.output_dir / PROJECTOR_FILE} and {self.output_dir / 'model'}"
                     + ("" if args.no_verify else " (reloaded and verified)"))
            if args.skip_bad_records:
                bad = data.bad
                self.say(f"skipped {len(bad)} bad record(s)"
                         + (f"; see {self.output_dir / 'bad_records.jsonl'}" if bad else ""))
                if summary["unreadable_images_skipped"]:
                    self.say(f"replaced {summary['unreadable_images_skipped']} record(s) whose image did not decode "
                             f"by the next readable one; see {prepared.unreadable_log}")
