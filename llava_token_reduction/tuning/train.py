"""`llava-token-reduction tune`: retrain the projector (or projector + LLM) of a VisionZip or TRIM checkpoint with
the reduction switched on, on LLaVA instruction data.

One accelerate loop runs everywhere: `llava-token-reduction tune ...` on one CPU or GPU, `accelerate launch
-m llava_token_reduction.tuning ...` on many GPUs (DDP, or DeepSpeed ZeRO-2 with the bundled config). See
docs/tuning.md.

Output directory:

    projector.safetensors     the tuned projector, keys multi_modal_projector.linear_{1,2}.{weight,bias}
    model/                    a complete checkpoint of the same model type with it (+ processor), reloaded and
                              compared before the command succeeds
    checkpoints/step-N/       resumable training state (accelerate state + trainer_state.json)
    log.jsonl                 one JSON object per optimizer step (loss, learning rate, gradient norm, ...)
    subset.json               the records trained on (index and id), bad_records.jsonl the skipped ones,
                              unreadable_images.jsonl those whose image only failed to decode mid-run
    summary.json              what was run and what came out
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

from ..inputs import FLOAT_DTYPES, parse_dtype
from ..methods import METHODS, for_model_type
from ..errors import print_failure
from .common import PROMPT_FORMATS, DataError, TuningError  # noqa: F401 - TuningError re-exported
from .state import (  # noqa: F401 - re-exported for callers of the old names
    STATE_FILE, RunLog, _check_saved_weights, _checkpoint_dirs, _keep_trainable_weights, _read_state,
    configure_trainable, tensor_digests,
)


PROG = "llava-token-reduction tune"
TRAINABLE_CHOICES = ("projector", "projector+llm")
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
UNREADABLE_FILE = "unreadable_images.jsonl"
PROJECTOR_FILE = "projector.safetensors"
PROJECTOR_PREFIX = "model.multi_modal_projector."


# Arguments -----------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    io = parser.add_argument_group("model, data and output")
    io.add_argument("--model", required=True, help="a checkpoint directory (with processor) of one of the methods: "
                    + ", ".join(method.model_type for method in METHODS.values()))
    io.add_argument("--data", required=True, help="LLaVA instruction data: a JSON list or JSON Lines file")
    io.add_argument("--image-folder", help="folder the records' `image` paths are relative to")
    io.add_argument("--output-dir", required=True, help="where the projector, checkpoint, logs and states go")
    for method in METHODS.values():
        for option in method.cli_options():
            option.add_to(io, help=f"{method.label}: override the checkpoint's {option.field}")

    data = parser.add_argument_group("data selection and encoding")
    data.add_argument("--fraction", type=float, help="train on this fraction of the records (0.1 = the 1/10 subset)")
    data.add_argument("--max-samples", type=int, help="train on at most this many records")
    data.add_argument("--seed", type=int, default=0, help="seed of the subset, the data order and initialisation (0)")
    data.add_argument("--skip-bad-records", action="store_true",
                      help="skip records that fail the checks (counted and listed) instead of stopping")
    data.add_argument("--skip-text-only", action="store_true", help="drop records without an image")
    data.add_argument("--full-image-check", action="store_true",
                      help="decode every image while checking the data (default: header check only)")
    data.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto",
                      help="chat-template (the processor's), llava-v1 (LLaVA-1.5 conversation format) or auto "
                           "(the chat template when there is one)")
    data.add_argument("--max-length", type=int, default=2048,
                      help="longest sequence in tokens, counting full image placeholder runs (2048)")
    data.add_argument("--image-aspect-ratio", choices=("pad", "crop"), default="pad",
                      help="pad to square with the mean colour as LLaVA-1.5 training does (default), or crop")
    data.add_argument("--num-workers", type=int, default=0, help="data loader worker processes (0)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--trainable", choices=TRAINABLE_CHOICES, default="projector",
                       help="projector (VisionZip recipe, default) or projector+llm (TRIM recipe); all else is frozen")
    optim.add_argument("--learning-rate", "--lr", type=float, default=2e-5, help="peak learning rate (2e-5)")
    optim.add_argument("--weight-decay", type=float, default=0.0)
    optim.add_argument("--lr-scheduler", default="cosine",
                       choices=("cosine", "linear", "constant", "constant_with_warmup"), help="(cosine)")
    optim.add_argument("--warmup-ratio", type=float, default=0.03, help="fraction of steps spent warming up (0.03)")
    optim.add_argument("--num-epochs", type=int, default=1)
    optim.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --num-epochs)")
    optim.add_argument("--per-device-batch-size", "--batch-size", type=int, default=1, dest="per_device_batch_size")
    optim.add_argument("--gradient-accumulation-steps", type=int, default=1)
    optim.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradients to this norm (0: off)")
    optim.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"),
                       help="autocast precision (default: accelerate's config or environment, else no)")
    optim.add_argument("--gradient-checkpointing", action="store_true", help="recompute LLM activations in backward")

    state = parser.add_argument_group("checkpoints, logging and output")
    state.add_argument("--save-steps", type=int, default=0, help="save a resumable state every N optimizer steps (0: never)")
    state.add_argument("--save-total-limit", type=int, help="keep only the newest N states")
    state.add_argument("--resume-from-checkpoint", metavar="DIR|latest",
                       help="continue from a saved state (a checkpoints/step-N directory, or the newest one)")
    state.add_argument("--logging-steps", type=int, default=1, help="print the loss every N optimizer steps (1)")
    state.add_argument("--no-progress", action="store_true", help="no progress bar")
    state.add_argument("--save-dtype", choices=SAVE_DTYPES, default="auto",
                       help="dtype of the saved weights (auto: the input checkpoint's)")
    state.add_argument("--no-verify", action="store_true", help="skip reloading the saved checkpoint to compare it")
    return parser


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tune", help="tune the projector (or projector + LLM) with token reduction on",
        description="Retrain the multi-modal projector of a VisionZip or TRIM checkpoint (optionally the LLM too) "
                    "with the reduction active, on LLaVA instruction data. Runs under `accelerate launch` as is.",
    )
    add_arguments(parser)
    parser.set_defaults(handler=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava_token_reduction.tuning", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traceback", action="store_true", help="show the full traceback when the command fails")
    return add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one line unless --traceback
        if args.traceback:
            raise
        return print_failure(PROG, error)


def run(args: argparse.Namespace) -> int:
    try:
        return Tuner(args).run()
    except DataError as error:
        raise TuningError(str(error)) from None


# Helpers -------------------------------------------------------------------------------------------------------


def _dtype(name):
    """The save dtype: `inputs.parse_dtype` of a name or dtype; float32 when the checkpoint records none."""
    import torch

    try:
        return parse_dtype(name, allowed=(*FLOAT_DTYPES, "float64"))
    except ValueError:
        return torch.float32

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
    def _check_args(self) -> None:
        args = self.args
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "num_epochs", "max_length", "logging_steps"):
            if getattr(args, name) < 1:
                raise TuningError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.max_steps is not None and args.max_steps < 1:
            raise TuningError(f"--max-steps must be >= 1, got {args.max_steps}")
        if args.save_steps < 0:
            raise TuningError(f"--save-steps must be >= 0, got {args.save_steps}")
        if args.save_total_limit is not None and args.save_total_limit < 1:
            raise TuningError(f"--save-total-limit must be >= 1 (or left out to keep every state), got {args.save_total_limit}")
        if not 0 <= args.warmup_ratio < 1:
            raise TuningError(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
        if not Path(args.model).is_dir():
            raise TuningError(f"--model must be a local checkpoint directory, got {args.model}")

    def _load_model(self):
        import torch
        from transformers import AutoConfig

        import llava_token_reduction  # noqa: F401 - registers the model types

        from ..loading import load_checkpoint
        from ..modeling.modeling_reduced_llava import ReducedLlavaForConditionalGeneration

        args = self.args
        source_config = AutoConfig.from_pretrained(args.model)
        method = for_model_type(source_config.model_type)
        if method is None:
            types = " or ".join(entry.model_type for entry in METHODS.values())
            raise TuningError(
                f"--model must be a {types} checkpoint, got model type {source_config.model_type!r}; convert it "
                f"first (`llava-token-reduction convert {'|'.join(METHODS)} ...`)"
            )
        for other in METHODS.values():
            for option in other.cli_options():
                if other is not method and getattr(args, option.field, None) is not None:
                    raise TuningError(f"{option.flag} applies to {other.label} checkpoints only")
        overrides = method.overrides_from(args)
        self.save_dtype = _dtype(getattr(source_config, "dtype", None) if args.save_dtype == "auto" else args.save_dtype)
        # fp32 master weights; --mixed-precision decides the compute precision. The loader refuses a checkpoint
        # whose weights did not all load.
        try:
            model, processor = load_checkpoint(args.model, method, overrides=overrides, dtype=torch.float32)
        except ValueError as error:
            raise TuningError(str(error)) from None
        if not isinstance(model, ReducedLlavaForConditionalGeneration):
            raise TuningError(f"{args.model} did not load as a token-reducing LLaVA ({type(model).__name__})")
        return model, processor

    def _resolve_resume(self) -> Path | None:
        value = self.args.resume_from_checkpoint
        if not value:
            return None
        if value == "latest":
            found = _checkpoint_dirs(self.output_dir)
            if not found:
                raise TuningError(f"--resume-from-checkpoint latest: no saved state under {self.output_dir / 'checkpoints'}")
            for directory in reversed(found):
                try:
                    _read_state(directory)
                except TuningError as error:  # e.g. cut short by a crash while saving: take the one before
                    print(f"warning: {error}; trying the previous saved state", file=sys.stderr)
                    continue
                return directory
            raise TuningError(f"--resume-from-checkpoint latest: no readable saved state under "
                              f"{self.output_dir / 'checkpoints'}")
        path = Path(value)
        if not (path / STATE_FILE).is_file():
            raise TuningError(f"--resume-from-checkpoint {path}: not a saved training state (no {STATE_FILE})")
        _read_state(path)
        return path

    # main -----------------------------------------------------------------------------------------------
    def run(self) -> int:
        import torch
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, set_seed
        from tqdm.auto import tqdm
        from transformers import get_scheduler

        from .data import (
            ConversationEncoder,
            EpochSampler,
            InstructionCollator,
            InstructionDataset,
            fingerprint,
            load_samples,
            read_unreadable_log,
        )

        args = self.args
        self._check_args()
        resume_dir = self._resolve_resume()
        self.accelerator = accelerator = Accelerator(
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            step_scheduler_with_optimizer=False,
        )
        main_process = accelerator.is_main_process
        set_seed(args.seed)
        started = time.time()

        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        model, processor = self._load_model()
        if deepspeed and accelerator.mixed_precision in ("bf16", "fp16"):
            # DeepSpeed keeps the module itself in half precision: frozen weights stay exact only if the input
            # checkpoint was stored in that precision.
            half = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16
            if self.save_dtype != half:
                raise TuningError(
                    f"DeepSpeed with {accelerator.mixed_precision} would round the frozen weights of this "
                    f"{str(self.save_dtype).replace('torch.', '')} checkpoint; convert it with --dtype "
                    f"{str(half).replace('torch.', '')} first (or train without DeepSpeed)")
        config = model.config
        # The collator builds the per-image side inputs of the method (TRIM's CLIP rows of each question).
        trim = bool(for_model_type(config.model_type).side_inputs)
        encoder = ConversationEncoder(processor, config.image_seq_length, config.image_token_id,
                                      args.prompt_format, args.max_length)
        samples, bad = load_samples(
            args.data, args.image_folder, fraction=args.fraction, max_samples=args.max_samples, seed=args.seed,
            skip_bad_records=args.skip_bad_records, skip_text_only=args.skip_text_only,
            decode_images=args.full_image_check, encoder=encoder,
        )
        data_fingerprint = fingerprint(samples)
        self.say(f"data: {len(samples)} record(s) from {args.data} ({encoder.prompt_format} prompts)"
                 + (f", {len(bad)} bad record(s) skipped" if bad else ""))
        if main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "subset.json").write_text(json.dumps(
                {"data": str(args.data), "fraction": args.fraction, "max_samples": args.max_samples,
                 "seed": args.seed, "fingerprint": data_fingerprint,
                 "records": [{"index": s.index, "id": s.record_id} for s in samples]}) + "\n")
            with open(self.output_dir / "bad_records.jsonl", "w", encoding="utf-8") as handle:
                for item in bad:
                    handle.write(json.dumps({"index": item.index, "id": item.record_id, "line": item.line,
                                             "reason": item.reason}) + "\n")

        trainable_names = configure_trainable(model, args.trainable)
        frozen_names = {name for name, _ in model.named_parameters()} - set(trainable_names)
        frozen_before = None
        if main_process:
            frozen_before = tensor_digests(
                ((n, p) for n, p in model.named_parameters() if n in frozen_names), self.save_dtype)
        trainable_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total_count = sum(p.numel() for p in model.parameters())
        self.say(f"model: {config.model_type} from {args.model}; training {args.trainable} "
                 f"({trainable_count:,} of {total_count:,} parameters), everything else frozen")

        config.text_config.use_cache = False
        if args.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        unreadable_log = self.output_dir / UNREADABLE_FILE
        if main_process and resume_dir is None and unreadable_log.exists():
            unreadable_log.unlink()  # a fresh run finds its own
        accelerator.wait_for_everyone()
        dataset = InstructionDataset(samples, encoder, processor, trim=trim, image_aspect_ratio=args.image_aspect_ratio,
                                     skip_unreadable=args.skip_bad_records, unreadable_log=unreadable_log,
                                     known_unreadable=read_unreadable_log(unreadable_log) if resume_dir else ())
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

        run_shape = {"data_fingerprint": data_fingerprint, "num_processes": accelerator.num_processes,
                     "per_device_batch_size": args.per_device_batch_size,
                     "gradient_accumulation_steps": args.gradient_accumulation_steps, "seed": args.seed,
                     "trainable": args.trainable, "total_steps": total_steps}
        global_step, epoch, batch_in_epoch = 0, 0, 0
        if resume_dir is not None:
            saved = _read_state(resume_dir)
            for key, value in run_shape.items():
                if saved["run"].get(key) != value:
                    raise TuningError(
                        f"cannot resume from {resume_dir}: {key} was {saved['run'].get(key)!r}, now {value!r} "
                        "(resume with the same data, subset, seed, batch shape, processes and steps)")
            if deepspeed:
                accelerator.load_state(str(resume_dir), load_module_strict=False)
            else:
                _check_saved_weights(resume_dir, accelerator, model)
                accelerator.load_state(str(resume_dir), strict=False)
            global_step, epoch, batch_in_epoch = saved["global_step"], saved["epoch"], saved["batch_in_epoch"]
            self.say(f"resumed from {resume_dir} at step {global_step} (epoch {epoch}, batch {batch_in_epoch})")

        log = RunLog(self.output_dir / "log.jsonl", main_process, resume=resume_dir is not None)
        log.write({"event": "resume" if resume_dir else "start", "step": global_step, "total_steps": total_steps,
                   "records": len(samples), "batches_per_epoch": batches_per_epoch, "args": vars(args) | {"handler": None}})
        self.say(f"training: {total_steps} optimizer step(s), {batches_per_epoch} batch(es) per epoch and process, "
                 f"{accelerator.num_processes} process(es), accumulation {args.gradient_accumulation_steps}, "
                 f"precision {accelerator.mixed_precision}")

        unwrapped = accelerator.unwrap_model(model)
        model.train()
        # Every frozen tower (the vision tower, a method's text tower) stays in eval mode.
        for name, child in unwrapped.model.named_children():
            if name not in ("multi_modal_projector", "language_model"):
                child.eval()
        projector_params = list(unwrapped.model.multi_modal_projector.parameters())
        trainable_params = [p for p in model.parameters() if p.requires_grad]
        progress = tqdm(total=total_steps, initial=global_step, desc="tuning", unit="step",
                        disable=args.no_progress or not accelerator.is_local_main_process, file=sys.stderr)
        window_losses, last_loss, grad_norm = [], None, None
        while global_step < total_steps:
            batches = accelerator.skip_first_batches(loader, batch_in_epoch) if batch_in_epoch else loader
            # accelerate's loaders pass their own epoch counter to the sampler when iterated; align it with ours
            # (a resumed run's fresh loader would otherwise restart from epoch 0's order).
            if hasattr(batches, "set_epoch"):
                batches.set_epoch(epoch)
            sampler.set_epoch(epoch)
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
                    self._save_state(global_step, epoch, batch_in_epoch, batches_per_epoch, run_shape)
                if global_step >= total_steps:
                    finished_epoch = batch_in_epoch >= batches_per_epoch
                    break
            if finished_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
        progress.close()

        accelerator.wait_for_everyone()
        state_dict = accelerator.get_state_dict(model)
        summary = None
        if main_process:
            summary = self._export(unwrapped, processor, state_dict, trainable_names, frozen_before)
            unreadable = len(read_unreadable_log(unreadable_log))
            summary.update({"steps": global_step, "final_loss": last_loss, "records": len(samples),
                            "bad_records_skipped": len(bad), "unreadable_images_skipped": unreadable,
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
                self.say(f"skipped {len(bad)} bad record(s)" + (f"; see {self.output_dir / 'bad_records.jsonl'}" if bad else ""))
                if summary["unreadable_images_skipped"]:
                    self.say(f"replaced {summary['unreadable_images_skipped']} record(s) whose image did not decode "
                             f"by the next readable one; see {unreadable_log}")
        return 0

    # state ----------------------------------------------------------------------------------------------
    def _save_state(self, global_step, epoch, batch_in_epoch, batches_per_epoch, run_shape) -> None:
        accelerator = self.accelerator
        directory = self.output_dir / "checkpoints" / f"step-{global_step:08d}"
        if accelerator.distributed_type.value == "DEEPSPEED":
            accelerator.save_state(str(directory), exclude_frozen_parameters=True)
        else:
            accelerator.save_state(str(directory))
        if accelerator.is_main_process:
            if batch_in_epoch >= batches_per_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
            state = {"global_step": global_step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "run": run_shape}
            (directory / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
            if self.args.save_total_limit:
                for old in _checkpoint_dirs(self.output_dir)[: -self.args.save_total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        self.say(f"saved training state {directory}")

    # output ---------------------------------------------------------------------------------------------
    def _export(self, unwrapped, processor, state_dict, trainable_names, frozen_before) -> dict:
        """Write the projector and the full checkpoint in the save dtype, then reload and compare."""
        import torch
        from safetensors.torch import load_file, save_file

        dtype = self.save_dtype
        frozen_names = set(frozen_before)
        frozen_after = tensor_digests(((n, p) for n, p in unwrapped.named_parameters() if n in frozen_names), dtype)
        changed = sorted(name for name in frozen_names if frozen_after[name] != frozen_before[name])
        if changed:
            raise TuningError(f"frozen parameters changed during training: {', '.join(changed[:5])}")

        cast = {name: (t.detach().to("cpu", dtype) if t.is_floating_point() else t.detach().cpu()).contiguous()
                for name, t in state_dict.items()}
        projector = {name[len("model."):]: cast[name].clone() for name in cast if name.startswith(PROJECTOR_PREFIX)}
        expected = {f"multi_modal_projector.linear_{i}.{kind}" for i in (1, 2) for kind in ("weight", "bias")}
        if set(projector) != expected:
            raise TuningError(f"unexpected projector tensors {sorted(projector)}; expected {sorted(expected)}")
        save_file(projector, str(self.output_dir / PROJECTOR_FILE),
                  metadata={"format": "pt", "model_type": unwrapped.config.model_type, "trainable": self.args.trainable,
                            "source": str(self.args.model)})

        if self.args.gradient_checkpointing:
            disable = getattr(unwrapped, "activation_checkpointing_disable", None)
            (disable or unwrapped.gradient_checkpointing_disable)()
        unwrapped.config.text_config.use_cache = True
        unwrapped.config.dtype = dtype
        model_dir = self.output_dir / "model"
        unwrapped.save_pretrained(str(model_dir), state_dict=cast)
        processor.save_pretrained(str(model_dir))
        summary = {"projector": str(self.output_dir / PROJECTOR_FILE), "model": str(model_dir),
                   "model_type": unwrapped.config.model_type, "trainable": self.args.trainable,
                   "save_dtype": str(dtype).replace("torch.", ""), "frozen_tensors_unchanged": len(frozen_names),
                   "verified": False}
        if self.args.no_verify:
            return summary

        from transformers import AutoModelForImageTextToText

        reloaded = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=dtype)
        if type(reloaded).__name__ != type(unwrapped).__name__:
            raise TuningError(f"the saved checkpoint reloads as {type(reloaded).__name__}, not {type(unwrapped).__name__}")
        from_file = load_file(str(self.output_dir / PROJECTOR_FILE))
        reloaded_state = reloaded.state_dict()
        for name, tensor in from_file.items():
            if not torch.equal(reloaded_state["model." + name].to(dtype), tensor):
                raise TuningError(f"verification failed: {name} differs between the checkpoint and {PROJECTOR_FILE}")
        for name in trainable_names:
            if not torch.equal(reloaded_state[name].to(dtype), cast[name]):
                raise TuningError(f"verification failed: tuned tensor {name} did not round-trip")
        reloaded_frozen = tensor_digests(((n, t) for n, t in reloaded_state.items() if n in frozen_names), dtype)
        changed = sorted(name for name in frozen_names if reloaded_frozen.get(name) != frozen_before[name])
        if changed:
            raise TuningError(f"verification failed: frozen tensors differ from the input checkpoint: {changed[:5]}")
        summary["verified"] = True
        return summary
