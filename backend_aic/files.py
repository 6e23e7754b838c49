"""The text of the files the compiler reads: specializations, custom IO, multi-device partition."""

from __future__ import annotations

__all__ = ["specializations", "specializations_json", "prefill_count", "custom_io_yaml", "mdp_json"]

import json

from qeff.backend_aic.model_info import ModelInfo
from qeff.backend_aic.options import ResolvedOptions
from qeff.contract import (BATCH_SIZE, COMP_CTX_LENGTHS, CTX_LEN, FULL_BATCH_SIZE, NUM_LOGITS_TO_KEEP, SEQ_LEN,
                           retained_name)
from qeff.errors import QeffError

def specializations(info: ModelInfo, o: ResolvedOptions) -> list[dict[str, str]]:
    """One dict of symbol values per specialization (prefill, then decode for a KV model),
    holding only the symbols the model's inputs use.

    After ``spec`` (QEfficient's speculative target) prefill keeps one logits row and each K
    of the manifest's ``spec.k`` gets a decode of ``seq_len = num_logits_to_keep = K + 1``.
    After ``ccl`` each compute context length of the prefill and the decode lists gets its own
    specialization (``comp_ctx_lengths``). Like QEfficient, several K with CCL are refused."""
    symbols = info.symbols()
    if not info.has_kv:
        return []  # a model without a KV cache fixes its symbols with -onnx-define-symbol
    prefill = {BATCH_SIZE: o.batch_size, SEQ_LEN: o.prefill_len, CTX_LEN: o.ctx_len}
    decode = {BATCH_SIZE: o.batch_size, SEQ_LEN: 1, CTX_LEN: o.ctx_len}
    if o.full_batch_size:
        prefill = {BATCH_SIZE: 1, SEQ_LEN: o.prefill_len, CTX_LEN: o.ctx_len, FULL_BATCH_SIZE: o.full_batch_size}
        decode = {BATCH_SIZE: o.full_batch_size, SEQ_LEN: 1, CTX_LEN: o.ctx_len,
                  FULL_BATCH_SIZE: o.full_batch_size}
    prefills, decodes = [prefill], [decode]
    spec, ccl = info.manifest.spec, info.manifest.ccl
    if spec is not None:
        ks = [int(k) for k in spec.get("k", [])]
        if not ks:
            raise QeffError("the manifest's spec section lists no K", "rewrite the model with spec:k=N")
        if ccl is not None and len(ks) > 1:
            raise QeffError(f"speculative decoding with several K ({'|'.join(map(str, ks))}) cannot be compiled with "
                            "compute context lengths", "use one K with ccl (spec:k=N), or drop ccl")
        prefills = [{**prefill, NUM_LOGITS_TO_KEEP: 1}]
        decodes = [{**decode, SEQ_LEN: k + 1, NUM_LOGITS_TO_KEEP: k + 1} for k in ks]
    if ccl is not None:
        lengths = {phase: [int(c) for c in ccl.get(phase, [])] for phase in ("prefill", "decode")}
        for phase, values in lengths.items():
            if not values or values != sorted(set(values)) or values[-1] != o.ctx_len:
                raise QeffError(f"compute context lengths for {phase} {values} must rise and end at ctx_len {o.ctx_len}",
                                f"rewrite the model with ccl:{phase}=...|{o.ctx_len}")
        prefills = [{**p, COMP_CTX_LENGTHS: c} for p in prefills for c in lengths["prefill"]]
        decodes = [{**d, COMP_CTX_LENGTHS: c} for d in decodes for c in lengths["decode"]]
    chosen = [*prefills, *decodes]
    unknown = sorted(symbols - set(chosen[0]))
    if unknown:
        raise QeffError(f"the model's inputs use symbols the compile cannot size: {', '.join(unknown)}",
                        "bind them with the fixed pass, e.g. fixed:" + ",".join(f"{s}=N" for s in unknown))
    return [{k: str(v) for k, v in spec.items() if k in symbols} for spec in chosen]


def prefill_count(info: ModelInfo) -> int:
    """How many of :func:`specializations` come first as prefill: one per prefill compute
    context length, else one."""
    ccl = info.manifest.ccl
    return len(ccl.get("prefill", [])) if ccl is not None and info.has_kv else 1


def _name(i: int, total: int, prefills: int) -> str:
    """Prefill, Decode; numbered (Prefill1, Decode2, …) when there are several of a kind."""
    kind, index, count = ("Prefill", i, prefills) if i < prefills else ("Decode", i - prefills, total - prefills)
    return kind if count == 1 else f"{kind}{index + 1}"


def specializations_json(specs: list[dict[str, str]], form: str, prefills: int = 1) -> str:
    """``flat`` works with every SDK; ``named`` is what newer SDKs take (older ones reject it
    with "type must be string, but is object"). The first ``prefills`` are prefill."""
    if form == "named":
        entries = [{"name": _name(i, len(specs), prefills), "symbols": s} for i, s in enumerate(specs)]
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
