"""Compile options, and how they are completed from the model's manifest (DESIGN §4)."""

from __future__ import annotations

__all__ = ["CompileOptions", "ResolvedOptions", "resolve_options", "check_options", "KV_PRECISIONS",
           "SPECIALIZATION_FORMATS", "INT_MAX"]

import dataclasses
import math
import numbers
import operator
from collections.abc import Mapping, Sequence
from pathlib import Path

from qeff.backend_aic.model_info import ModelInfo, file_beside_model
from qeff.errors import QeffError

KV_PRECISIONS = ("float16", "bfloat16", "mxint8")
SPECIALIZATION_FORMATS = ("flat", "named")
# Sizes, counts and device ids go to the compiler and the runtime as signed 32-bit integers.
INT_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """What ``qeff compile`` takes. None means: from the manifest, else the default."""

    num_cores: int = 16
    batch_size: int | None = None
    prefill_len: int | None = None
    ctx_len: int | None = None
    full_batch_size: int | None = None
    devices: Sequence[int] = ()
    mos: int | None = None
    ols: int | None = None
    depth_first: bool = False
    mxfp6: bool | None = None
    kv_precision: str | None = None
    specializations_format: str = "flat"
    compiler: str | None = None
    hw_version: str | None = None
    extra_flags: Sequence[str] = ()
    dry_run: bool = False
    timeout: float | None = None
    convert_to_fp16: bool = True
    # Models without a KV cache (encoders): each symbol is fixed with -onnx-define-symbol.
    define_symbols: Mapping[str, int] = dataclasses.field(default_factory=dict)
    multicast_weights: bool = False
    stats_batchsize: int | None = None
    # Precision of named inputs/outputs on the card (custom_io.yaml), on top of the KV cache's.
    custom_io: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ResolvedOptions:
    num_cores: int
    batch_size: int
    prefill_len: int
    ctx_len: int | None
    full_batch_size: int | None
    devices: tuple[int, ...]
    mos: int | None
    ols: int | None
    depth_first: bool
    mxfp6: bool
    kv_precision: str
    specializations_format: str
    extra_flags: tuple[str, ...]
    node_precision_info: Path | None
    convert_to_fp16: bool
    define_symbols: tuple[tuple[str, int], ...]
    multicast_weights: bool
    stats_batchsize: int | None
    custom_io: tuple[tuple[str, str], ...]
    # The model's layers are ONNX functions (the subfunctions pass): -sub-functions.
    sub_functions: bool = False


def _count(name: str, value: object, low: int = 1, hint: str | None = None) -> int | None:
    """``value`` as an int in ``low..INT_MAX`` (None passes): a bool, a fraction or a number the
    compiler cannot hold would otherwise reach its command line or a specializations file."""
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise QeffError(f"{name} must be a whole number, got {value!r}", hint or f"e.g. {name}={max(low, 1)}") from None
    if not low <= number <= INT_MAX:
        raise QeffError(f"{name} must be between {low} and {INT_MAX}, got {number}",
                        hint or f"e.g. {name}={max(low, 1)}")
    return number


def check_options(options: CompileOptions) -> None:
    """Refuse option values that no model makes valid, before the model is read or a file written."""
    for name in ("num_cores", "batch_size", "prefill_len", "ctx_len", "full_batch_size", "mos", "ols",
                 "stats_batchsize"):
        _count(f"--{name.replace('_', '-')}", getattr(options, name))
    timeout = options.timeout
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not math.isfinite(timeout) \
                or timeout <= 0:
            raise QeffError(f"--timeout must be a finite number of seconds above 0, got {timeout!r}",
                            "e.g. --timeout 3600, or leave it out to wait for the compiler")
    devices = list(options.devices)
    for device in devices:
        _count("--devices", device, low=0)
    if len(set(devices)) != len(devices):
        raise QeffError(f"--devices {','.join(map(str, devices))}: each device id once, none negative",
                        "e.g. --devices 0,1,2,3")
    for name, value in dict(options.define_symbols).items():
        _count(f"--define-symbol {name}", value)
    if options.prefill_len is not None and options.ctx_len is not None and options.prefill_len > options.ctx_len:
        raise QeffError(f"--prefill-len {options.prefill_len} is longer than the cache ({options.ctx_len})",
                        "use a shorter prefill length")


def resolve_options(options: CompileOptions, info: ModelInfo) -> ResolvedOptions:
    """Fill what the user left open from the manifest and the model, and check it against the model."""
    manifest = info.manifest
    check_options(options)
    if options.kv_precision is not None and options.kv_precision not in KV_PRECISIONS:
        raise QeffError(f"unknown KV precision {options.kv_precision!r}", f"choose one of {', '.join(KV_PRECISIONS)}")
    if options.specializations_format not in SPECIALIZATION_FORMATS:
        raise QeffError(f"unknown specializations format {options.specializations_format!r}",
                        "choose flat (every SDK) or named (newer SDKs)")
    bad = [f for f in options.extra_flags if not f.startswith("-") or len(f) < 2]
    if bad:
        raise QeffError(f"extra compiler flag {bad[0]!r} does not start with '-'", "e.g. --flag=-aic-perf-metrics")
    ctx = options.ctx_len or manifest.ctx_len
    model_ctx = info.cache_length()
    if info.has_kv:
        if isinstance(model_ctx, int) and ctx is not None and ctx != model_ctx:
            raise QeffError(f"--ctx-len {ctx} does not match the model's KV inputs, whose cache length is fixed "
                            f"at {model_ctx} ({info.kv_inputs[0]})",
                            f"use --ctx-len {model_ctx}, or rewrite the model with kv:ctx_len={ctx}")
        ctx = ctx or (model_ctx if isinstance(model_ctx, int) else None)
        if ctx is None:
            raise QeffError("the model's cache length is symbolic and no ctx_len is known",
                            "pass --ctx-len N")
    specs = manifest.specializations
    prefill_default = next((s.get("seq_len") for s in specs if s.get("seq_len", 1) > 1), None)
    prefill = options.prefill_len or prefill_default or 32
    # The manifest only promises positive numbers; what goes to the compiler must also fit 32 bits.
    _count("the cache length (ctx_len) from the manifest or the model", ctx, hint="pass --ctx-len N")
    _count("the prefill length from the manifest's specializations", prefill, hint="pass --prefill-len N")
    if ctx is not None and prefill > ctx:
        raise QeffError(f"--prefill-len {prefill} is longer than the cache ({ctx})", "use a shorter prefill length")
    full_batch = options.full_batch_size or manifest.full_batch_size
    _count("the full_batch_size from the manifest", full_batch, hint="pass --full-batch-size N")
    if info.continuous_batching and not full_batch:
        raise QeffError("the model has continuous batching (batch_index) but no full batch size is known",
                        "pass --full-batch-size N")
    if not info.continuous_batching and options.full_batch_size:
        raise QeffError("--full-batch-size needs a model with continuous batching (batch_index input)",
                        "rewrite it with kv:continuous_batching=true")
    kv_precision = manifest.kv.precision if manifest.kv is not None else None
    kv_default = "mxint8" if "mxint8" in manifest.custom_io.values() or kv_precision == "mxint8" else "float16"
    mx = manifest.mx or {}
    mxfp6 = options.mxfp6 if options.mxfp6 is not None else mx.get("compiler_flag") == "-mxfp6-matmul"
    npi = manifest.node_precision_info
    # The manifest is data a user may have been handed: the file it names is copied into the
    # compile folder, so it must be a file of the model's own folder, not any file on the machine.
    node_precision = file_beside_model(info.path, "node_precision_info", npi) if npi is not None else None
    defines = _define_symbols(options, info) if not info.has_kv else ()
    if info.has_kv and options.define_symbols:
        raise QeffError("--define-symbol is for models without a KV cache; a KV model compiles specializations",
                        "use --batch-size, --prefill-len and --ctx-len")
    names = set(info.input_dims) | set(info.output_names)
    for name, precision in options.custom_io.items():
        if name not in names:
            raise QeffError(f"--custom-io {name}: the model has no input or output {name!r}",
                            f"its I/O: {', '.join(sorted(names))}")
        if precision not in KV_PRECISIONS:
            raise QeffError(f"--custom-io {name}={precision}: unknown precision", f"choose one of {', '.join(KV_PRECISIONS)}")
    return ResolvedOptions(
        num_cores=options.num_cores, batch_size=options.batch_size or 1, prefill_len=prefill,
        ctx_len=ctx, full_batch_size=full_batch if info.continuous_batching else None,
        devices=tuple(options.devices), mos=options.mos, ols=options.ols, depth_first=options.depth_first,
        mxfp6=bool(mxfp6), kv_precision=options.kv_precision or kv_default,
        specializations_format=options.specializations_format, extra_flags=tuple(options.extra_flags),
        node_precision_info=node_precision, convert_to_fp16=options.convert_to_fp16,
        define_symbols=defines, multicast_weights=options.multicast_weights, stats_batchsize=options.stats_batchsize,
        custom_io=tuple(options.custom_io.items()),
        sub_functions=bool((manifest.subfunctions or {}).get("functions")),
    )


def _define_symbols(options: CompileOptions, info: ModelInfo) -> tuple[tuple[str, int], ...]:
    """A value for every symbol of a model without a KV cache: --batch-size sizes the batch
    symbol (the first dim of the first input), --define-symbol the others."""
    symbols = info.symbols()
    values = dict(options.define_symbols)
    for name, value in values.items():
        if name not in symbols:
            raise QeffError(f"--define-symbol {name}: the model has no symbol {name!r}",
                            f"its symbols: {', '.join(sorted(symbols)) or 'none'}")
    first = next(iter(info.input_dims.values()), [])
    batch = first[0] if first and isinstance(first[0], str) else None
    if batch is not None and batch not in values:
        values[batch] = options.batch_size or 1
    missing = sorted(symbols - set(values))
    if missing:
        raise QeffError(f"no value for the model's symbol{'s' if len(missing) > 1 else ''} {', '.join(missing)}",
                        "add " + " ".join(f"--define-symbol {m}=N" for m in missing))
    order = [d for dims in info.input_dims.values() for d in dims if isinstance(d, str)]
    return tuple((name, values[name]) for name in dict.fromkeys(order))
