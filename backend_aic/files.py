"""The text of the files the compiler reads: specializations, custom IO, multi-device partition."""

from __future__ import annotations

__all__ = ["specializations", "specializations_json", "custom_io_yaml", "mdp_json"]

import json

from qeff.backend_aic.model_info import ModelInfo
from qeff.backend_aic.options import ResolvedOptions
from qeff.contract import BATCH_SIZE, CTX_LEN, FULL_BATCH_SIZE, SEQ_LEN, retained_name
from qeff.errors import QeffError

_NAMES = ("Prefill", "Decode")


def specializations(info: ModelInfo, o: ResolvedOptions) -> list[dict[str, str]]:
    """One dict of symbol values per specialization (prefill, then decode for a KV model),
    holding only the symbols the model's inputs use."""
    symbols = info.symbols()
    if info.has_kv:
        prefill = {BATCH_SIZE: o.batch_size, SEQ_LEN: o.prefill_len, CTX_LEN: o.ctx_len}
        decode = {BATCH_SIZE: o.batch_size, SEQ_LEN: 1, CTX_LEN: o.ctx_len}
        if o.full_batch_size:
            prefill = {BATCH_SIZE: 1, SEQ_LEN: o.prefill_len, CTX_LEN: o.ctx_len, FULL_BATCH_SIZE: o.full_batch_size}
            decode = {BATCH_SIZE: o.full_batch_size, SEQ_LEN: 1, CTX_LEN: o.ctx_len,
                      FULL_BATCH_SIZE: o.full_batch_size}
        chosen = [prefill, decode]
    else:
        return []  # a model without a KV cache fixes its symbols with -onnx-define-symbol
    unknown = sorted(symbols - set(chosen[0]))
    if unknown:
        raise QeffError(f"the model's inputs use symbols the compile cannot size: {', '.join(unknown)}",
                        "bind them with the fixed pass, e.g. fixed:" + ",".join(f"{s}=N" for s in unknown))
    return [{k: str(v) for k, v in spec.items() if k in symbols} for spec in chosen]


def specializations_json(specs: list[dict[str, str]], form: str) -> str:
    """``flat`` works with every SDK; ``named`` is what newer SDKs take (older ones reject it
    with "type must be string, but is object")."""
    if form == "named":
        entries = [{"name": _NAMES[i] if len(specs) > 1 else "Prefill", "symbols": s} for i, s in enumerate(specs)]
        return json.dumps({"specializations": entries}, indent=2) + "\n"
    return json.dumps({"specializations": specs}, indent=2) + "\n"


def custom_io_yaml(info: ModelInfo, precision: str, extra: tuple[tuple[str, str], ...] = ()) -> str:
    """Every KV input and its retained-state output, in layer order, at ``precision``; then the
    names in ``extra`` (which also override a KV entry's precision)."""
    chosen = dict(extra)
    entries = []
    for name in info.kv_inputs:
        for io_name in (name, retained_name(name)):
            if io_name == name or io_name in info.retained_outputs:
                entries.append((io_name, chosen.pop(io_name, precision)))
    entries.extend(chosen.items())
    return "".join(f" - IOName: {name}\n   Precision: {p}\n\n" for name, p in entries)


def mdp_json(devices: int, num_cores: int) -> str:
    """One partition over ``devices`` devices (logical ids 0..n-1), peer to peer."""
    ids = list(range(devices))
    config = {"connections": [{"devices": ids, "type": "p2p"}],
              "partitions": [{"name": "Partition0",
                              "devices": [{"deviceId": d, "numCores": num_cores} for d in ids]}]}
    return json.dumps(config, indent=2) + "\n"
