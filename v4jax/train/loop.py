"""The training loop: validate, resume, train, evaluate, checkpoint, sample, summarise.

`train(config, workdir)` is the whole main job and the API the Colab notebook calls; the CLI in
`__main__` only parses flags and turns errors into one-line messages. Everything that can be wrong
with the input (config values, data paths, a checkpoint of another model in the workdir) is checked
before the workdir is touched.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from v4jax import config as config_lib
from v4jax.parallel.distributed import compile_in_step
from v4jax.parallel.mesh import mesh_shape
from v4jax.parallel.training import MeshPlan
from v4jax.train import checkpoint as ckpt_lib
from v4jax.train import metrics as metrics_lib
from v4jax.train.anticipation import LookaheadQueue
from v4jax.train.sample import sample_text
from v4jax.train.stability import AnticipationController, SpikeDetector
from v4jax.train.state import TrainState, create_train_state, init_variables
from v4jax.train.step import (
    lr_decay_start,
    make_eval_step,
    make_route_step,
    make_train_step,
    mtp_weight_fn,
)


@dataclasses.dataclass
class TrainResult:
    """What a finished run reports (also printed as the summary line)."""

    steps: int
    seconds: float
    train_loss: float
    eval_loss: float | None
    bits_per_byte: float | None
    tokens_per_second: float
    sample: str
    history: list[dict[str, Any]]
    state: TrainState
    summary: str


def _say(line: str) -> None:
    print(line, flush=True)


def _bytes_per_token_ratio(tokenizer: Any, batches: list[dict[str, np.ndarray]]) -> float:
    """UTF-8 bytes per target token over the eval batches (1 for the byte tokenizer)."""
    tokens = sum(float(b["loss_mask"].sum()) for b in batches)
    if type(tokenizer).__name__ == "ByteTokenizer" or tokens == 0:
        return 1.0
    n_bytes = 0
    for b in batches:
        for row, mask in zip(b["targets"], b["loss_mask"]):
            n_bytes += len(tokenizer.decode([int(t) for t, m in zip(row, mask) if m > 0]).encode("utf-8"))
    return n_bytes / tokens


def prepare(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """All checks that must pass before the workdir is touched; returns what they loaded."""
    from v4jax.data import build_tokenizer, load_corpus

    config_lib.validate(config)
    mesh_shape(config.mesh, jax.device_count())  # one-line ConfigError when the mesh needs other devices
    tokenizer = build_tokenizer(config.data)
    try:
        corpus = load_corpus(config.data)
    except (FileNotFoundError, OSError) as err:
        raise config_lib.ConfigError(f"config.data.paths: {err}") from None
    fingerprint = config_lib.model_fingerprint(config)
    ckpt_lib.check_compatible(os.path.join(workdir, "checkpoints"), fingerprint)
    return {"tokenizer": tokenizer, "corpus": corpus, "fingerprint": fingerprint}


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainResult:
    """Trains `config` into `workdir` (resuming from its latest checkpoint), evaluates, samples, summarises."""
    from v4jax import quant
    from v4jax.data import build_pipeline
    from v4jax.model import ModelConfig, Transformer
    from v4jax.optim import build_optimizer, learning_rate_schedule

    loaded = prepare(config, workdir)
    tokenizer, corpus = loaded["tokenizer"], loaded["corpus"]
    t = config.train
    os.makedirs(workdir, exist_ok=True)
    primary = jax.process_index() == 0  # several processes share the workdir: the first one writes its files
    if primary:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))

    model_cfg = ModelConfig.from_config(config.model)
    # QAT (config.qat): the model fake-quantizes per the policy, blended in by a factor computed from the
    # traced step counter (quant.qat_active), so late-stage QAT needs no recompile; off: the plain model
    policy = quant.QATPolicy.from_config(config.qat)
    model = Transformer(model_cfg, qat=policy) if policy.enabled else Transformer(model_cfg)
    qat_factor = functools.partial(quant.qat_active, total_steps=t.steps, policy=policy) if policy.enabled else None
    init_tokens = jnp.zeros((t.batch_size, t.seq_len), jnp.int32)
    abstract_params = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0), init_tokens))["params"]
    tx = build_optimizer(config.optim, abstract_params, t.steps)
    # the mesh of config.mesh (one device by default); the state is created directly in its shardings
    plan = MeshPlan.create(config.mesh, model, init_tokens)
    state, state_shardings = plan.init_state(lambda: create_train_state(model, tx, init_tokens, t.seed))
    schedule = learning_rate_schedule(config.optim, t.steps)
    decay_start = lr_decay_start(schedule, t.steps) if t.mtp_weight_schedule == "paper" else t.steps

    bias_fns = _router_bias_fns(model_cfg)
    train_step = plan.jit_step(make_train_step(
        model, tx, lr_schedule=schedule, mtp_weight=mtp_weight_fn(t, decay_start),
        balance_loss_weight=float(t.balance_loss_weight), router_bias_speed=float(t.router_bias_speed),
        skip_nonfinite=bool(config.stability.skip_nonfinite), qat_factor=qat_factor, **bias_fns), state_shardings)
    eval_step = plan.under_mesh(compile_in_step(jax.jit(make_eval_step(model, qat_factor)), "eval_step"))
    route_step = plan.under_mesh(compile_in_step(jax.jit(make_route_step(model)), "route_step"))

    detector, anticipation = SpikeDetector(config.stability), AnticipationController(config.stability)
    # several processes: each keeps its block of every global train batch (put_batch(..., process_local=True));
    # the few eval batches stay whole on every process (their bytes-per-token ratio is computed on the host)
    train_it = build_pipeline(config.data, tokenizer=tokenizer, split="train", seq_len=t.seq_len,
                              batch_size=t.batch_size, seed=t.seed, corpus=corpus,
                              process_index=jax.process_index(), process_count=jax.process_count())
    queue = LookaheadQueue(train_it, anticipation.delta)
    eval_it = build_pipeline(config.data, tokenizer=tokenizer, split="eval", seq_len=t.seq_len,
                             batch_size=t.batch_size, seed=t.seed, corpus=corpus)
    eval_batches = [next(eval_it) for _ in range(t.eval_batches)]
    bytes_per_token = _bytes_per_token_ratio(tokenizer, eval_batches)

    # ---- resume ----------------------------------------------------------------------------------
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), t.keep_checkpoints)

    def restore(template: TrainState) -> tuple[int, TrainState] | None:
        restored = checkpointer.restore_latest(template)
        if restored is None:
            return None
        step, new_state, meta, routing = restored
        queue.set_state(meta["data_iterator"], routing, meta["routing_valid"])
        detector.load_state_dict(meta["spike_detector"])
        anticipation.load_state_dict(meta["anticipation"])
        return step, new_state

    start_step = 0
    restored = restore(state)
    if restored is not None:
        start_step, state = restored
        _say(f"resumed from step {start_step} ({os.path.join(workdir, 'checkpoints', str(start_step))})")
    if primary:
        metrics_lib.truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), start_step)
    writer = metrics_lib.MetricsWriter(workdir, primary=primary)

    def evaluate(params, buffers, step: int) -> tuple[float, float]:
        # with QAT, the factor of the last trained step (the one logged with this evaluation)
        qat_step = () if qat_factor is None else (jnp.asarray(max(step - 1, 0), jnp.int32),)
        nll, count = 0.0, 0.0
        for batch in eval_batches:
            s, n = eval_step(params, buffers, plan.put_batch(batch), *qat_step)
            nll, count = nll + float(s), count + float(n)
        loss = nll / max(count, 1.0)
        return loss, loss / math.log(2) / bytes_per_token

    def save(step: int) -> None:
        iterator_state, arrays, valid = queue.get_state()
        checkpointer.save(step, state, {"model_fingerprint": loaded["fingerprint"], "data_iterator": iterator_state,
                                        "routing_valid": valid, "spike_detector": detector.state_dict(),
                                        "anticipation": anticipation.state_dict()}, arrays)

    # ---- train -----------------------------------------------------------------------------------
    tokens_per_step = t.batch_size * t.seq_len
    progress = metrics_lib.Progress(t.progress and primary, t.steps, start_step)
    eval_loss = bits_per_byte = None
    started = window_start = time.perf_counter()
    window_steps, anticipation_forwards = 0, 0
    first_step_seconds = None
    step = start_step
    while step < t.steps:
        if t.profile and step == start_step + 2:
            # one trace directory per process: processes on one host would write files of the same name
            jax.profiler.start_trace(os.path.join(workdir, "profile", *(
                [f"process_{jax.process_index()}"] if jax.process_count() > 1 else [])))
        anticipating, transition = anticipation.update(step)
        if anticipating:
            params, buffers = state.params, state.buffers
            anticipation_forwards += queue.anticipate(
                lambda b: route_step(params, buffers, plan.put_batch(b, process_local=True)))  # noqa: B023  (called now)
        entry = queue.pop()
        routed = None if entry.routed_indices is None else jnp.asarray(entry.routed_indices)
        state, step_metrics = train_step(state, plan.put_batch(entry.batch, process_local=True), routed)
        source = "current" if routed is None else "anticipated"
        step += 1
        if first_step_seconds is None:  # the first step includes the compile: timed apart
            jax.block_until_ready(step_metrics)
            first_step_seconds = time.perf_counter() - started
        window_steps += 1
        # while anticipatory routing is on (or its routes are still arriving) every step is logged, so that
        # metrics.jsonl shows the routing source of each step
        is_log = step % t.log_every == 0 or step == t.steps or anticipating or routed is not None
        is_eval = step % t.eval_every == 0 or step == t.steps
        event = None
        if is_log or is_eval or detector.cfg.spike_detection or transition is not None:
            host = jax.device_get(step_metrics)
            event = detector.observe(step, float(host["loss"]))
        if event is not None and event.rollback and checkpointer.all_steps():
            checkpointer.wait()
            back_step, state = restore(state)
            detector.rolled_back_to(back_step)
            anticipation.on_spike(back_step)
            writer.write(step, dict(host, **event.metrics(), **detector.metrics()))
            progress.write(f"step {step}: loss spike {event.loss:.3f}; rolled back to step {back_step}")
            progress.update(back_step - step)
            step, window_steps, window_start = back_step, 0, time.perf_counter()
            continue
        if is_log or is_eval or event is not None or transition is not None:
            elapsed = time.perf_counter() - window_start
            record = dict(host, routing_source=source, anticipation_active=anticipating,
                          anticipation_forwards=anticipation_forwards,
                          step_time=elapsed / window_steps, tokens_per_second=tokens_per_step * window_steps / elapsed)
            record.update(detector.metrics(), **(event.metrics() if event else {}), **(transition or {}))
            if is_eval:
                eval_loss, bits_per_byte = evaluate(state.params, state.buffers, step)
                record.update(eval_loss=eval_loss, bits_per_byte=bits_per_byte)
                progress.write(f"step {step}: eval loss {eval_loss:.3f} ({bits_per_byte:.3f} bits/byte)")
            last_record = writer.write(step, record)
            progress.update(window_steps, loss=f"{last_record['loss']:.3f}",
                            tok_s=f"{last_record['tokens_per_second']:,.0f}")
            window_start, window_steps = time.perf_counter(), 0
        if t.profile and step == start_step + 6:
            jax.profiler.stop_trace()
        if step % t.checkpoint_every == 0 or step == t.steps:
            save(step)
    progress.update(window_steps)
    progress.close()
    seconds = time.perf_counter() - started
    checkpointer.close()

    if eval_loss is None:  # nothing left to train (resumed a finished run)
        eval_loss, bits_per_byte = evaluate(state.params, state.buffers, int(state.step))
    sample = sample_text(model, state.variables, tokenizer, t.sample_prompt, t.sample_tokens,
                         temperature=float(t.sample_temperature), seed=t.seed)
    writer.write_text(int(state.step), "sample", sample)
    writer.close()
    # the other processes read process 0's file where the workdir is shared (the whole history, on resume too)
    history = _read_history(writer.jsonl_path) if primary or os.path.exists(writer.jsonl_path) else writer.records
    train_loss = float(history[-1]["lm_loss"]) if history else float("nan")
    ran = t.steps - start_step
    steady = seconds - (first_step_seconds or 0.0)  # excludes the first (compiling) step
    tok_s = (ran - 1) * tokens_per_step / steady if ran > 1 and steady > 0 else 0.0
    summary = (f"done: {t.steps} steps ({ran} this run) in {seconds:.1f} s (first step incl. compile "
               f"{first_step_seconds or 0.0:.1f} s), train loss {train_loss:.3f}, "
               f"eval loss {eval_loss:.3f} ({bits_per_byte:.3f} bits/byte), {tok_s:,.0f} tok/s"
               + (f", {anticipation_forwards} anticipation forwards" if anticipation_forwards else ""))
    _say(f"sample: {t.sample_prompt}{sample}")
    _say(summary)
    return TrainResult(steps=t.steps, seconds=seconds, train_loss=train_loss, eval_loss=eval_loss,
                       bits_per_byte=bits_per_byte, tokens_per_second=tok_s, sample=sample, history=history,
                       state=state, summary=summary)


def _router_bias_fns(model_cfg: Any) -> dict[str, Any]:
    """The bias callables for make_train_step (bias update only on learned-routing layers)."""
    from v4jax import model as model_lib
    from v4jax.optim.router_bias import update_router_bias

    learned = jnp.asarray(model_lib.learned_router_mask(model_cfg))  # [L_moe] (main layers then MTP)
    return {"learned_layers": learned, "router_bias": functools.partial(model_lib.router_bias, model_cfg),
            "with_router_bias": functools.partial(model_lib.with_router_bias, model_cfg),
            "update_router_bias": update_router_bias}


def _read_history(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
