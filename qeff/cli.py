"""Command-line interface: ``qeff-opt`` (run passes) and ``qeff`` (export, opt, demo).

Errors the user can fix are printed as one line on stderr with exit code 2 and no traceback;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from qeff.errors import QeffError

logger = logging.getLogger(__name__)

console = Console()
err_console = Console(stderr=True)


INT_MAX = 2**31 - 1  # sizes and counts: what the compiler and the runtime take


def _count(low: int = 1, high: int = INT_MAX):
    """An integer option's check: ``low <= value <= high``."""
    def check(value: int | None) -> int | None:
        if value is not None and not low <= value <= high:
            raise typer.BadParameter(f"{value} is not between {low} and {high}")
        return value
    return check


def _seed():
    return _count(0, 2**32 - 1)  # what numpy's generators take


def _number(low: float | None = None, above: float | None = None, high: float | None = None):
    """A float option's check: finite, and ``>= low``, ``> above``, ``<= high`` as given."""
    def check(value: float | None) -> float | None:
        if value is None:
            return value
        if not math.isfinite(value):
            raise typer.BadParameter(f"{value} is not a finite number")
        if low is not None and value < low:
            raise typer.BadParameter(f"{value} is below {low:g}")
        if above is not None and value <= above:
            raise typer.BadParameter(f"{value} must be above {above:g}")
        if high is not None and value > high:
            raise typer.BadParameter(f"{value} is above {high:g}")
        return value
    return check


class _State:
    debug = False
    program = "qeff"


def _define_symbols(items: Optional[list[str]]) -> dict[str, int]:
    """``--define-symbol NAME=VALUE`` options as a dict (models without a KV cache)."""
    defines: dict[str, int] = {}
    for item in items or ():
        name, _, value = item.partition("=")
        if not name or not value.strip().isdigit():
            raise QeffError(f"--define-symbol {item!r} is not NAME=VALUE", "e.g. --define-symbol sequence_length=128")
        defines[name.strip()] = int(value)
    return defines


def _set_debug(debug: bool) -> None:
    if debug:
        _State.debug = True
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")


def _interrupted_line(program: str) -> str:
    from qeff import entry
    from qeff.common.atomic import published

    written = published()
    what = entry.received or "interrupted"
    if not written:
        return f"{program}: {what}; nothing was written"
    return f"{program}: {what}; already written: {', '.join(str(p) for p in written)}"


def _fail(program: str, message: str) -> None:
    # The message is plain text (it may hold "[b, h, S, d]"); only the prefix is markup.
    err_console.print(f"[bold red]{program}: error:[/] ", end="", highlight=False)
    err_console.print(" ".join(message.split()), highlight=False, soft_wrap=True, markup=False)
    sys.exit(2)


def _click_exceptions():
    """The exceptions of the click typer runs on (newer typers carry their own copy)."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def _run_app(app: typer.Typer, program: str) -> None:
    """Invoke a typer app: a QeffError or a bad option is one line on stderr and exit code 2;
    an interrupt (Ctrl-C or SIGTERM) says whether anything was written."""
    from qeff import entry
    from qeff.common.atomic import forget_published

    click = _click_exceptions()
    _State.program = program
    entry.install_handlers()  # also when called without the console script
    forget_published()

    def interrupted() -> None:
        err_console.print(_interrupted_line(program), highlight=False, soft_wrap=True, markup=False)
        sys.exit(entry.exit_code())

    try:
        # Click reports its own usage errors; out of standalone mode they reach us and are
        # printed as one line like ours. Typer turns an interrupt into exit code 130.
        code = app(prog_name=program, standalone_mode=False)
    except click.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e), err=True)
        sys.exit(2)
    except click.ClickException as e:
        if _State.debug:
            raise
        _fail(program, f"{e.format_message()} — see {program} --help")
    except (typer.Abort, KeyboardInterrupt):
        interrupted()
    except QeffError as e:
        if _State.debug:
            raise
        _fail(program, e.one_line())
    except Exception as e:  # a bug, not bad input: say so, keep it short unless --debug
        if _State.debug:
            raise
        first = str(e).splitlines()[0] if str(e).strip() else ""
        err_console.print(
            f"[bold red]{program}: internal error:[/] {type(e).__name__}: {first} "
            "(rerun with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
    if entry.received:
        interrupted()
    if isinstance(code, int) and code:
        sys.exit(code)


# ----------------------------------------------------------------------------------------
# qeff-opt
# ----------------------------------------------------------------------------------------

def print_pass_list() -> None:
    from qeff.passes import PASS_REGISTRY, describe_options

    table = Table(title="qeff-opt passes", title_justify="left", show_lines=True)
    table.add_column("pass", style="bold")
    table.add_column("what it does")
    table.add_column("options (name:key=value,…)")
    for name, cls in sorted(PASS_REGISTRY.items()):
        options = "\n".join(
            f"{opt}: {typ} = {default}" + (f" — {help_}" if help_ else "")
            for opt, typ, default, help_ in describe_options(cls)
        )
        needs = f"\nneeds: {', '.join(cls.requires_passes)}" if cls.requires_passes else ""
        table.add_row(name, cls.summary + needs, options or "—")
    console.print(table)


def run_opt(
    model: Optional[Path],
    passes: Optional[str],
    output: Optional[Path],
    ctx_len: Optional[int],
    verify: bool,
    tolerance: Optional[float],
    report: Optional[Path],
    external_data: Optional[bool],
    quiet: bool,
    plot: Optional[Path] = None,
    link_data: bool = False,
    verify_text: Optional[Path] = None,
    max_perplexity_increase: Optional[float] = None,
    min_top1_agreement: Optional[float] = None,
) -> None:
    from qeff.optimizer import optimize
    from qeff.verify.quality import QualityThresholds
    from qeff.passes import default_output_path
    from qeff.passes.infra.pipeline import build_passes, parse_pipeline
    from qeff.verify import describe

    if model is None:
        raise QeffError("no model given", "usage: qeff-opt MODEL.onnx --passes cleanup,fold [-o OUT.onnx]")
    if not passes:
        raise QeffError("no passes given", "add --passes, e.g. --passes cleanup,fold (see --list-passes)")
    overrides = {"ctx_len": str(ctx_len)} if ctx_len is not None else None
    pipeline = build_passes(parse_pipeline(passes), overrides)
    if output is None:
        output = default_output_path(model, pipeline)
    if plot is not None:
        _check_plot(plot, pipeline)
        from qeff.common.paths import check_output_file, model_files

        taken = model_files(model) | model_files(output) | ({report.resolve()} if report else set())
        check_output_file(plot, "--plot", taken)
    limits = {k: v for k, v in (("max_perplexity_increase", max_perplexity_increase),
                                 ("min_top1_agreement", min_top1_agreement)) if v is not None}
    start = time.perf_counter()
    result = optimize(
        model,
        pipeline,
        output,
        verify=verify or verify_text is not None or bool(limits),
        verify_text=verify_text,
        quality=QualityThresholds(**limits),
        tolerance=tolerance,
        report_path=report,
        external_data=external_data,
        link_data=link_data,
        progress=not quiet,
    )
    weight_errors = {r.name: r.details["weights"] for r in result.report.passes
                     if isinstance(r.details, dict) and r.details.get("weights")}
    if plot is not None:
        from qeff.passes.mx.error_report import plot_weight_errors

        plot_weight_errors(weight_errors, plot)
    if quiet:
        return
    console.print(result.report.rich_table())
    if weight_errors:
        from qeff.passes.mx.error_report import weight_error_table

        for name, weights in weight_errors.items():
            console.print(weight_error_table(name, weights))
    if result.report.verification is not None:
        console.print(f"verify: {describe(result.report.verification)}", markup=False, highlight=False)
    console.print(
        f"wrote {result.output} and {result.manifest_path.name}"
        + (f", report {report}" if report else "")
        + f" in {time.perf_counter() - start:.1f} s"
    )


def explain_pass(model: Optional[Path], name: str, ctx_len: Optional[int]) -> None:
    """``--explain kv``: the matcher's findings per layer, as a table; nothing is written."""
    if name != "kv":
        raise QeffError(f"--explain {name}: only kv can be explained", "use --explain kv")
    if model is None:
        raise QeffError("no model given", "usage: qeff-opt MODEL.onnx --explain kv")
    from qeff.passes.ir.model_io import as_ir_model, check_model
    from qeff.passes.kv.explain import explain_kv

    ir_model = as_ir_model(model)
    check_model(ir_model)
    rows, rejected, summary = explain_kv(ir_model, ctx_len or 256)
    table = Table(title=f"kv in {model.name}: {summary}", title_justify="left")
    for column in ("layer", "site", "heads", "kv", "dim", "scale", "RoPE", "visibility", "soft-cap", "sinks", "bias"):
        table.add_column(column, justify="right" if column in ("layer", "heads", "kv", "dim") else "left",
                         no_wrap=column == "visibility")
    kinds = {"decomposed": "core", "attention_op": "Attention"}
    for r in rows:
        table.add_row(str(r.layer), kinds.get(r.kind, r.kind), str(r.n_heads), str(r.n_kv_heads), str(r.head_dim),
                      "—" if r.scale is None else f"{r.scale:.4g}", "yes" if r.rope else "no", r.visibility,
                      "—" if r.softcap is None else f"{r.softcap:g}", "yes" if r.sinks else "no", r.bias)
    console.print(table)
    for rejection in rejected:
        where = f"layer {rejection.layer}: " if rejection.layer is not None else ""
        console.print(f"rejected: {where}{rejection}", markup=False, highlight=False)


def _check_plot(plot: Path, pipeline: list) -> None:
    """Fail before any work when --plot cannot be honoured."""
    if not any(getattr(p, "fmt", "") for p in pipeline):
        raise QeffError("--plot draws the per-weight error of an MX pass, and none is in --passes",
                        "add mxfp6, mxfp4, mxfp8 or mxint8, or drop --plot")
    from qeff.common.paths import check_plot_file

    check_plot_file(plot)


opt_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@opt_app.command(context_settings={"help_option_names": ["-h", "--help"]})
def qeff_opt(
    model: Optional[Path] = typer.Argument(None, help="input ONNX model (never modified)"),
    passes: Optional[str] = typer.Option(
        None, "--passes", "-p", help="comma-separated passes with options, e.g. cleanup,fold:max_elements=4096"
    ),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="output model (default: MODEL.<passes>.onnx)"),
    ctx_len: Optional[int] = typer.Option(None, "--ctx-len", help="context length for passes that take ctx_len", callback=_count()),
    verify: bool = typer.Option(False, "--verify", help="compare original and rewritten model in onnxruntime"),
    tolerance: Optional[float] = typer.Option(
        None, "--tolerance",
        help="what --verify accepts: max abs difference (default 1e-4), or with fp16clip in the "
             "pipeline the difference relative to the largest reference value (default 1e-2)", callback=_number(low=0.0)),
    report: Optional[Path] = typer.Option(None, "--report", help="write the change report as JSON"),
    verify_text: Optional[Path] = typer.Option(
        None, "--verify-text",
        help="UTF-8 text on which --verify measures a lossy pipeline's perplexity change and top-1 agreement "
             "(implies --verify; the tokenizer is found as by qeff eval). Default for the reference model: its "
             "held-out split"),
    max_perplexity_increase: Optional[float] = typer.Option(
        None, "--max-perplexity-increase",
        help="what --verify on a text accepts: relative perplexity increase (default 0.05, i.e. 5 %)",
        callback=_number(low=0.0)),
    min_top1_agreement: Optional[float] = typer.Option(
        None, "--min-top1-agreement", help="what --verify on a text accepts: share of top-1 tokens agreeing with "
                                           "the input model (default 0.9)", callback=_number(low=0.0, high=1.0)),
    plot: Optional[Path] = typer.Option(None, "--plot", help="draw the per-weight error of MX passes per layer (.png)"),
    external_data: Optional[bool] = typer.Option(
        None, "--external-data/--no-external-data", help="weights in a .data file (default: as the input, or when > 1 GiB)"
    ),
    link_data: bool = typer.Option(
        False, "--link-data",
        help="share the input's unchanged weights with the output by hard-linking its data file instead of "
             "copying it (same file system; saves the copy's time and disk). Risk: both names are then one "
             "file, so writing into it in place changes the input and the output alike (replacing or "
             "deleting either name does not)"),
    list_passes: bool = typer.Option(False, "--list-passes", help="list passes and their options, then exit"),
    explain: Optional[str] = typer.Option(
        None, "--explain", metavar="kv",
        help="show what a pass finds in each layer (kv: attention sites, heads, RoPE, visibility rule, soft-cap, sinks, bias, and "
             "the candidates it rejected, with the reason) and write nothing"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print nothing on success"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks and debug logs"),
) -> None:
    """Rewrite an ONNX model with qeff-opt passes (kv, fixed, fp16clip, mx*, cleanup, fold…)."""
    _set_debug(debug)
    if list_passes:
        print_pass_list()
        return
    if explain is not None:
        explain_pass(model, explain, ctx_len)
        return
    run_opt(model, passes, output, ctx_len, verify, tolerance, report, external_data, quiet, plot, link_data,
            verify_text, max_perplexity_increase, min_top1_agreement)


def opt_main() -> None:
    _run_app(opt_app, "qeff-opt")


# ----------------------------------------------------------------------------------------
# qeff
# ----------------------------------------------------------------------------------------

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="qeff-opt: export Hugging Face LLMs to ONNX and rewrite them for Cloud AI 100.",
)


@app.callback()
def _main_options(
    debug: bool = typer.Option(False, "--debug", help="show tracebacks and debug logs"),
) -> None:
    _set_debug(debug)


# ``qeff opt`` is the same command as ``qeff-opt``.
app.command("opt", help="Rewrite an ONNX model with qeff-opt passes (same as qeff-opt).")(qeff_opt)


@app.command("export")
def export_command(
    source: Optional[Path] = typer.Argument(
        None, help="local model folder with config.json and *.safetensors"
    ),
    tiny: Optional[str] = typer.Option(None, "--tiny", help="built-in tiny random model by architecture, e.g. llama"),
    reference: bool = typer.Option(
        False, "--reference", help="the reference model: a small Llama trained on Python's documentation, "
                                   "shipped with the package (what qeff eval measures quality on)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="output .onnx (default: <name>.onnx)"),
    exporter: str = typer.Option("dynamo", "--exporter", help="dynamo or torchscript"),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default: the exporter's)", callback=_count()),
    seed: int = typer.Option(0, "--seed", help="seed for the tiny model's random weights", callback=_seed()),
    attn: str = typer.Option("eager", "--attn", help="attention implementation: eager or sdpa"),
    external_data: Optional[bool] = typer.Option(
        None, "--external-data/--no-external-data",
        help="weights in a .data file (default: always for a folder, whose weights are streamed; "
             "for --tiny when > 1 GiB)"
    ),
    check: str = typer.Option(
        "auto", "--check", metavar="auto|full|prefix|none",
        help="compare onnxruntime with torch after export: full (the logits; holds the model twice), "
             "prefix (the hidden state after the first --check-layers layers, a few hundred MB at any "
             "size), auto (full up to 1 GiB of float32 weights, else prefix) or none"),
    no_check: bool = typer.Option(False, "--no-check", help="same as --check none"),
    # 2 is the frontend's DEFAULT_CHECK_LAYERS, not imported here: the frontend takes seconds to import.
    check_layers: int = typer.Option(2, "--check-layers", help="decoder layers the prefix check compares",
                                     callback=_count()),
    task: Optional[str] = typer.Option(
        None, "--task", help="encoders (bert, roberta, xlm-roberta): base, qa, classification or embeddings"),
) -> None:
    """Export a Hugging Face causal LM (input_ids, attention_mask, position_ids → logits) or an
    encoder (--tiny bert|roberta|xlm-roberta, or a folder, with --task) to plain ONNX."""
    from qeff.errors import ExportError
    from qeff.frontend.api import CHECKS
    from qeff.frontend.encoder import ENCODER_ARCHITECTURES, is_encoder_folder

    if no_check:
        check = "none"
    if reference:
        if source is not None or tiny is not None or task is not None:
            raise ExportError("--reference is a model of its own", "drop the model folder, --tiny or --task")
        from qeff.reference import CHECKPOINT

        source, output = CHECKPOINT, output if output is not None else Path("reference.onnx")
    if check not in CHECKS:
        raise ExportError(f"unknown check {check!r}", f"use --check {', '.join(CHECKS[:-1])} or {CHECKS[-1]}")
    if task is not None or tiny in ENCODER_ARCHITECTURES or (source is not None and is_encoder_folder(source)):
        # An encoder has its own check, a full one: any choice but none runs it.
        _export_encoder(source, tiny, output, task or "base", seed, check != "none")
        return

    if exporter not in ("dynamo", "torchscript"):
        raise ExportError(f"unknown exporter {exporter!r}", "use --exporter dynamo or --exporter torchscript")
    if attn not in ("eager", "sdpa"):
        raise ExportError(f"unknown attention implementation {attn!r}", "use --attn eager or --attn sdpa")
    if (source is None) == (tiny is None):
        raise ExportError("give either a model folder or --tiny ARCH", "e.g. qeff export --tiny llama -o llama.onnx")
    if output is None:
        name = tiny if tiny else (source.resolve().name or "model")
        output = Path(f"{name}.onnx")
    from qeff.passes.ir.model_io import check_output_path

    check_output_path(output)
    from qeff.frontend import export_model

    result = export_model(
        source=source,
        tiny=tiny,
        output=output,
        exporter=exporter,
        opset=opset,
        seed=seed,
        attn_implementation=attn,
        external_data=external_data,
        check=check,
        check_layers=check_layers,
        progress=True,
    )
    console.print(
        f"exported {result.architecture} ({result.num_parameters:,} parameters) with {result.exporter}, "
        f"opset {result.opset}, to {result.path} in {result.seconds:.1f} s"
    )
    if result.check == "full":
        console.print(f"onnxruntime vs torch: max abs logits difference {result.max_abs_diff:.2e}")
    elif result.check == "prefix":
        console.print(f"onnxruntime vs torch after the first {result.checked_layers} decoder layers: "
                      f"max abs hidden-state difference {result.max_abs_diff:.2e}")


@app.command("compile")
def compile_command(
    model: Path = typer.Argument(..., help="the .onnx qeff-opt wrote (its manifest beside it supplies defaults)"),
    output: Path = typer.Option(..., "--output", "-o", help="compile folder (the QPC goes to OUTPUT/qpc)"),
    num_cores: int = typer.Option(16, "--num-cores", help="AI cores per device", callback=_count()),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="batch size (default 1)", callback=_count()),
    prefill_len: Optional[int] = typer.Option(None, "--prefill-len", help="prefill sequence length (default: manifest, else 32)", callback=_count()),
    ctx_len: Optional[int] = typer.Option(None, "--ctx-len", help="cache length (default: manifest or the model)", callback=_count()),
    full_batch_size: Optional[int] = typer.Option(None, "--full-batch-size", help="continuous batching: cache rows", callback=_count()),
    devices: Optional[str] = typer.Option(None, "--devices", help="device ids, e.g. 0,1,2,3 (more than one: multi-device partition)"),
    mos: Optional[int] = typer.Option(None, "--mos", help="compiler -mos (effort to reduce on-chip memory)", callback=_count()),
    ols: Optional[int] = typer.Option(None, "--ols", help="compiler -ols (split factor for operations)", callback=_count()),
    depth_first: bool = typer.Option(False, "--depth-first", help="compiler -aic-enable-depth-first"),
    mxfp6: Optional[bool] = typer.Option(None, "--mxfp6/--no-mxfp6", help="-mxfp6-matmul (default: from the manifest)"),
    kv_precision: Optional[str] = typer.Option(None, "--kv-precision", help="float16, bfloat16 or mxint8 (default: manifest)"),
    specializations_format: str = typer.Option("flat", "--specializations-format", help="flat (every SDK) or named (newer SDKs)"),
    compiler: Optional[str] = typer.Option(None, "--compiler", help="compiler executable (default: $QAIC_COMPILER, then the SDK's)"),
    hw_version: Optional[str] = typer.Option(None, "--hw-version", help="hardware version (default ai100; 2.0 for qaic-exec)"),
    flag: Optional[list[str]] = typer.Option(None, "--flag", help="extra compiler flag, repeatable, e.g. --flag=-aic-perf-metrics"),
    define_symbol: Optional[list[str]] = typer.Option(
        None, "--define-symbol", help="models without a KV cache: NAME=VALUE for a symbol, repeatable (e.g. sequence_length=128)"),
    multicast_weights: bool = typer.Option(False, "--multicast-weights", help="compiler -multicast-weights"),
    custom_io: Optional[list[str]] = typer.Option(
        None, "--custom-io", help="NAME=PRECISION (float16, bfloat16, mxint8) for an input or output, repeatable"),
    stats_batchsize: Optional[int] = typer.Option(None, "--stats-batchsize", help="compiler -stats-batchsize", callback=_count()),
    dry_run: bool = typer.Option(False, "--dry-run", help="write the files and the command, do not compile"),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="stop the compiler after this many seconds", callback=_number(above=0.0)),
) -> None:
    """Lower a rewritten model to the Cloud AI compiler: specializations or defined symbols, custom IO, multi-device, QPC."""
    from qeff.backend_aic import CompileOptions, compile_model

    device_ids: tuple[int, ...] = ()
    if devices:
        try:
            device_ids = tuple(int(d) for d in devices.split(",") if d.strip())
        except ValueError:
            raise QeffError(f"--devices {devices}: not a list of numbers", "e.g. --devices 0,1") from None
    defines = _define_symbols(define_symbol)
    io: dict[str, str] = {}
    for item in custom_io or ():
        name, _, precision = item.partition("=")
        if not name or not precision:
            raise QeffError(f"--custom-io {item!r} is not NAME=PRECISION", "e.g. --custom-io logits=float16")
        io[name.strip()] = precision.strip()
    options = CompileOptions(
        custom_io=io, define_symbols=defines, multicast_weights=multicast_weights, stats_batchsize=stats_batchsize,
        num_cores=num_cores, batch_size=batch_size, prefill_len=prefill_len, ctx_len=ctx_len,
        full_batch_size=full_batch_size, devices=device_ids, mos=mos, ols=ols, depth_first=depth_first,
        mxfp6=mxfp6, kv_precision=kv_precision, specializations_format=specializations_format, compiler=compiler,
        hw_version=hw_version, extra_flags=tuple(flag or ()), dry_run=dry_run, timeout=timeout,
    )
    result = compile_model(model, output, options, console=console)
    console.print(result.command_text, soft_wrap=True, markup=False, highlight=False)
    if result.status == "dry-run":
        written = ", ".join([*sorted(result.files.values()), "command.txt"])
        console.print(f"dry run: wrote {written} to {result.folder}")
    elif result.status == "cached":
        console.print(f"unchanged since the last compile (hash {result.hash}): kept {result.qpc}")
    else:
        console.print(f"compiled {result.qpc} in {result.seconds:.1f} s (log: {result.folder / 'compile.log'})")


@app.command("run")
def run_command(
    model: Path = typer.Argument(..., help="a KV model (.onnx) or a compile folder / QPC for the card"),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", help="text to continue (repeat for a batch); needs --tokenizer"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="local tokenizer folder (tokenizer.json)"),
    input_ids: Optional[list[str]] = typer.Option(None, "--input-ids", help="token ids instead of text, e.g. 5,9,3 (repeatable)"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="tokens to generate per prompt", callback=_count()),
    prefill_len: Optional[int] = typer.Option(None, "--prefill-len", help="prefill chunk (default: the compiled one, else 32)", callback=_count()),
    ctx_len: Optional[int] = typer.Option(None, "--ctx-len", help="cache length of an .onnx model (default: its manifest)", callback=_count()),
    full_batch_size: Optional[int] = typer.Option(None, "--full-batch-size", help="continuous batching: cache rows", callback=_count()),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy; else sample", callback=_number(low=0.0)),
    top_k: int = typer.Option(0, "--top-k", help="sample from the k most likely tokens (0: all)", callback=_count(low=0)),
    top_p: float = typer.Option(1.0, "--top-p", help="sample from the smallest set reaching this probability", callback=_number(above=0.0, high=1.0)),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed for sampling", callback=_seed()),
    device_id: int = typer.Option(0, "--device-id", help="Cloud AI device for a QPC", callback=_count(low=0)),
    stats_json: Optional[Path] = typer.Option(None, "--stats-json", help="also write the tokens and stats (encoders: the outputs) as JSON"),
    text_file: Optional[Path] = typer.Option(None, "--text-file", help="inputs, one per line (needs --tokenizer)"),
    prepack: bool = typer.Option(
        False, "--prepack/--no-prepack",
        help="onnxruntime: copy the weights into its packed MatMul layout (faster long prefills, a second "
             "copy of every weight in memory); by default they are used in place from the mapped data file",
    ),
) -> None:
    """Generate with a KV model (onnxruntime, or a compiled QPC on the card), streaming tokens and
    printing the stats; or run an encoder on a padded batch and print its outputs."""
    from qeff.runtime import generate
    from qeff.runtime import run as runner

    if stats_json is not None:
        from qeff.common.paths import check_output_file, model_files

        inputs = [*model_files(model), *(p for p in (text_file, tokenizer) if p is not None)]
        check_output_file(stats_json, "--stats-json", inputs)
    texts = runner.read_prompts(prompt, text_file)
    tok = runner.load_tokenizer(tokenizer) if tokenizer is not None else None
    session = runner.open_session(model, ctx_len=ctx_len, full_batch_size=full_batch_size, device_id=device_id,
                                  prepack=prepack)
    encoder = not session.retained
    prompts = runner.encode_prompts(texts, input_ids, tok, special_tokens=encoder)
    with session:
        if encoder:
            outputs, lines = runner.run_encoder(session, prompts, tok)
            for line in lines:
                console.print(line, markup=False, highlight=False)
            if stats_json is not None:
                runner.write_json(stats_json, {k: v.tolist() for k, v in outputs.items()})
            return
        stream = runner.TextStream(tok, len(prompts))

        def show(row: int, token: int) -> None:
            piece = stream(row, token)
            if len(prompts) == 1:  # a batch is printed per prompt at the end
                console.print(piece, end="", markup=False, highlight=False)

        result = generate(session, prompts, max_new_tokens, prefill_len=prefill_len,
                          eos_token_id=getattr(tok, "eos_token_id", None), temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed, stream=show)
    if len(prompts) == 1:
        console.print()
    for line in runner.generation_lines(result, len(prompts), stream):
        console.print(line, markup=False, highlight=False)
    if stats_json is not None:
        runner.write_json(stats_json, {"tokens": result.tokens, "stats": result.stats.as_dict()})


def _export_encoder(source: Optional[Path], tiny: Optional[str], output: Optional[Path], task: str, seed: int,
                    check: bool) -> None:
    from qeff.errors import ExportError
    from qeff.frontend.encoder import build_tiny_encoder, export_encoder, load_encoder
    from qeff.passes.ir.model_io import check_output_path

    if (source is None) == (tiny is None):
        raise ExportError("give either a model folder or --tiny ARCH", "e.g. qeff export --tiny bert --task qa")
    output = output or Path(f"{tiny or source.resolve().name}-{task}.onnx")
    check_output_path(output)
    model = build_tiny_encoder(tiny, task, seed) if tiny else load_encoder(source, task)
    result = export_encoder(model, task, output, check=check)
    console.print(f"exported {result.architecture} ({task}: {', '.join(result.outputs)}) with TorchScript, opset 17, "
                  f"inputs {', '.join(result.inputs)} [batch_size, sequence_length], to {result.path} "
                  f"in {result.seconds:.1f} s", markup=False)
    if result.max_abs_diff is not None:
        console.print(f"onnxruntime vs torch on a padded batch: max abs difference {result.max_abs_diff:.2e}")


@app.command("bench")
def bench_command(
    model: Path = typer.Argument(..., help="a model without a KV cache (.onnx), e.g. an exported encoder"),
    batch_size: str = typer.Option("1,4,8", "--batch-size", help="batch sizes, comma-separated"),
    instances: str = typer.Option("1,2", "--instances", help="sessions running side by side, comma-separated"),
    seq_len: int = typer.Option(128, "--seq-len", help="sequence length of the generated inputs", callback=_count()),
    duration: float = typer.Option(2.0, "--duration", help="seconds per configuration", callback=_number(above=0.0)),
    json_path: Optional[Path] = typer.Option(None, "--json", help="also write the table as JSON"),
) -> None:
    """Inferences/s and latency percentiles on onnxruntime, per batch size and instance count."""
    import dataclasses as dc
    import json as json_module

    from rich.table import Table

    from qeff.runtime.throughput import bench_model

    def numbers(text: str, what: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise QeffError(f"--{what} {text!r} is not a list of numbers", f"e.g. --{what} 1,4,8") from None
        if not values:
            raise QeffError(f"--{what} is empty", f"e.g. --{what} 1,4,8")
        return values

    if json_path is not None:
        from qeff.common.paths import check_output_file, model_files

        check_output_file(json_path, "--json", model_files(model))
    rows = bench_model(model, numbers(batch_size, "batch-size"), numbers(instances, "instances"),
                       seq_len=seq_len, duration=duration)
    table = Table(title=f"qeff bench {model.name} (onnxruntime CPU, sequence length {seq_len})")
    for column in ("batch", "instances", "inferences/s", "calls", "p50 ms", "p90 ms", "p99 ms"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r.batch_size), str(r.instances), f"{r.inferences_per_s:,.1f}", str(r.calls),
                      f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}", f"{r.p99_ms:.2f}")
    console.print(table)
    if json_path is not None:
        from qeff.common.atomic import write_text_atomic

        write_text_atomic(json_path, json_module.dumps({"model": str(model), "seq_len": seq_len,
                                                        "rows": [dc.asdict(r) for r in rows]}, indent=2) + "\n")


@app.command("tune")
def tune_command(
    model: Path = typer.Argument(..., help="a model without a KV cache (.onnx), e.g. an exported encoder"),
    space_file: Path = typer.Option(..., "--space", help="the search space: the model configurator's JSON (either format)"),
    objective: Optional[str] = typer.Option(
        None, "--objective", metavar="max-throughput|min-latency", help="what to optimise (default: the space file's)"),
    backend: str = typer.Option("aic", "--backend", metavar="aic|cpu",
                                help="aic: compile and run on the card; cpu: measure with onnxruntime"),
    grid: bool = typer.Option(False, "--grid", help="measure every point of the space instead of searching"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the compile and run commands; measure nothing"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="also write every measurement as JSON"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="draw throughput against p99 latency (.png)"),
    parallel_compiles: int = typer.Option(4, "--parallel-compiles", help="aic: compiles running at once", callback=_count()),
    workdir: Optional[Path] = typer.Option(
        None, "--workdir", help="aic: compile folders and run results (default: tune-<model name>); kept, and reused "
                                "by the next search"),
    seconds: Optional[float] = typer.Option(
        None, "--time", help="seconds per point (aic: qaic-runner --time, default 5; cpu: default 1)",
        callback=_number(above=0.0, high=86400.0)),
    total_cores: Optional[int] = typer.Option(
        None, "--total-cores", help="cores that cores × instances must fit in (aic: the card's, default 16; cpu: "
                                    "threads × instances, default the CPU count)", callback=_count()),
    device_id: int = typer.Option(0, "--device-id", help="aic: the device qaic-runner runs on", callback=_count(low=0)),
    define_symbol: Optional[list[str]] = typer.Option(
        None, "--define-symbol", help="aic: NAME=VALUE for a symbol other than the batch, repeatable (e.g. sequence_length=128)"),
    multicast_weights: bool = typer.Option(True, "--multicast-weights/--no-multicast-weights",
                                           help="aic: compile with -multicast-weights"),
    compiler: Optional[str] = typer.Option(None, "--compiler", help="aic: compiler executable (as qeff compile)"),
    runner: Optional[str] = typer.Option(None, "--runner", help="aic: qaic-runner (default: $QAIC_RUNNER, then the SDK's)"),
    hw_version: Optional[str] = typer.Option(None, "--hw-version", help="aic: hardware version (as qeff compile)"),
    flag: Optional[list[str]] = typer.Option(None, "--flag", help="aic: extra compiler flag, repeatable"),
    compile_timeout: Optional[float] = typer.Option(None, "--compile-timeout", help="aic: stop a compile after this many seconds",
                                                    callback=_number(above=0.0)),
    seq_len: int = typer.Option(128, "--seq-len", help="cpu: sequence length of the generated inputs", callback=_count()),
    top: int = typer.Option(10, "--top", help="rows of the table (the JSON has every point)", callback=_count()),
) -> None:
    """Search compile and run settings for throughput or latency: the Cloud AI model configurator
    (a local search from each starting point, or --grid), on the card or on onnxruntime."""
    import json as json_module
    import os

    from qeff.common.paths import check_plot_file
    from qeff.tune.report import plot_front, result_json, result_table
    from qeff.tune.space import load_space

    if backend not in ("aic", "cpu"):
        raise QeffError(f"unknown backend {backend!r}", "use --backend aic or --backend cpu")
    from qeff.common.paths import check_output_file, model_files

    taken = model_files(model) | {space_file.resolve()}
    if json_path is not None:
        check_output_file(json_path, "--json", taken)
        taken |= {json_path.resolve()}
    if plot is not None:
        check_output_file(plot, "--plot", taken)
        check_plot_file(plot)
    cores = total_cores or (16 if backend == "aic" else os.cpu_count() or 1)
    space = load_space(space_file, backend=backend, total_cores=cores, objective=objective, exhaustive=True if grid else None)
    defines = _define_symbols(define_symbol)
    settings = None
    if backend == "aic":
        from qeff.tune.aic import AicSettings

        folder = workdir or Path(f"tune-{model.name.removesuffix('.onnx')}")
        if folder.exists() and not folder.is_dir():
            raise QeffError(f"--workdir {folder} is a file", "give a folder (it is created when missing)")
        settings = AicSettings(model=model, workdir=folder, seconds=seconds or 5.0, device_id=device_id,
                               parallel_compiles=parallel_compiles, define_symbols=defines,
                               multicast_weights=multicast_weights, compiler=compiler, runner=runner,
                               hw_version=hw_version, extra_flags=tuple(flag or ()), compile_timeout=compile_timeout)
    from qeff.tune import tune_model
    from qeff.tune.report import describe

    status = console.status("measuring") if not dry_run else None
    count = 0

    def progress(config: dict, m) -> None:
        nonlocal count
        count += 1
        if status is not None:
            what = f"{m.inf_per_s:,.1f} inf/s, p50 {m.p50_ms:.3f} ms" if m.ok else "failed"
            status.update(f"{count} measured; last: {describe(config)}: {what}")

    if status is not None:
        status.start()
    try:
        outcome = tune_model(model, space, dry_run=dry_run, aic=settings, seq_len=seq_len, seconds=seconds or 1.0,
                             on_result=progress)
    finally:
        if status is not None:
            status.stop()
    if dry_run:
        what = "every point of the grid" if space.exhaustive else \
            f"the {len(space.initial)} starting point{'s' if len(space.initial) != 1 else ''}; the search then moves " \
            f"to neighbours of the best point measured (at most {space.max_evals} points per start)"
        console.print(f"dry run: the commands for {what}", markup=False, highlight=False)
        for line in outcome.plan:
            console.print(line, soft_wrap=True, markup=False, highlight=False)
        return
    result = outcome.result
    where = "onnxruntime CPU" if backend == "cpu" else "Cloud AI"
    title = f"qeff tune {model.name} ({where}, {space.objective})"
    console.print(result_table(outcome.rows, space, title, top))
    search = "grid" if space.exhaustive else f"local search from {len(space.initial)} starting points"
    console.print(f"{search}: measured {len(result.evaluated)} of the {result.grid_size} points in the space"
                  + (f" ({result.reused} reused from earlier runs)" if result.reused else "")
                  + (f"; compiled {outcome.compiles} QPCs" if backend == "aic" else ""), highlight=False)
    failed = [r for r in outcome.rows if not r.measurement.ok]
    if failed:
        console.print(f"{len(failed)} points failed; first: {describe(failed[0].config)}: {failed[0].measurement.error}",
                      markup=False, highlight=False, soft_wrap=True)
    if outcome.best is None:
        raise QeffError("no point could be measured", "see the failures above (and the logs in the work folder)")
    console.print(f"best for {space.objective}: {describe(outcome.best.config)}", markup=False, highlight=False)
    console.print(outcome.best_settings, soft_wrap=True, markup=False, highlight=False)
    if json_path is not None:
        from qeff.common.atomic import write_text_atomic

        payload = result_json(result, space, outcome.rows, model=str(model), backend=backend,
                              best_settings=outcome.best_settings,
                              extra={"seconds_per_point": seconds or (5.0 if backend == "aic" else 1.0)}
                              | ({"seq_len": seq_len} if backend == "cpu" else {}))
        write_text_atomic(json_path, json_module.dumps(payload, indent=2) + "\n")
    if plot is not None:
        plot_front(outcome.rows, plot, title)
    written = [str(p) for p in (json_path, plot) if p is not None]
    if written:
        console.print(f"wrote {', '.join(written)}", markup=False, highlight=False)


@app.command("latency-stats")
def latency_stats_command(
    files: list[Path] = typer.Argument(..., help="qaic-runner's aic-profiling-program-N-latency.txt files"),
    keep_middle: Optional[float] = typer.Option(
        None, "--keep-middle", metavar="PCT", help="keep the middle PCT percent of each file's inferences (drop as many "
                                                   "from its start as from its end)", callback=_number(above=0.0, high=100.0)),
    json_path: Optional[Path] = typer.Option(None, "--json", help="also write the table as JSON"),
) -> None:
    """Latency percentiles (mean, min, 50, 75, 90, 95, 99, max, in ms) of every latency column of
    qaic-runner's --aic-profiling-type latency files, all files combined."""
    import json as json_module

    from qeff.tune.latency import TOTAL, format_stats, latency_stats

    if json_path is not None:
        from qeff.common.paths import check_output_file

        check_output_file(json_path, "--json", files)
    table = latency_stats(files, keep_middle)
    stats = table.stats()
    console.print(f"{len(files)} file{'s' if len(files) != 1 else ''} combined, {table.inferences} inferences"
                  + (f" (the middle {keep_middle:g} % of each)" if keep_middle is not None else ""), highlight=False)
    for line in format_stats(stats):
        console.print(line, soft_wrap=True, markup=False, highlight=False)
    if TOTAL in stats:
        console.print(f"{TOTAL}: mean {stats[TOTAL]['mean']:.3f} ms", highlight=False)
    if json_path is not None:
        from qeff.common.atomic import write_text_atomic

        write_text_atomic(json_path, json_module.dumps({"files": [str(f) for f in files], "keep_middle": keep_middle,
                                                        "inferences": table.inferences, "stats_ms": stats},
                                                       indent=2) + "\n")


@app.command("eval")
def eval_command(
    model: Path = typer.Argument(..., help="an .onnx model: a plain export or a KV model from qeff-opt"),
    reference: Optional[Path] = typer.Option(
        None, "--reference", help="the model to compare with, e.g. the plain fp32 export this model came from"),
    text: Optional[Path] = typer.Option(
        None, "--text", help="UTF-8 text to evaluate on (default: the reference model's held-out split)"),
    tokenizer: Optional[Path] = typer.Option(
        None, "--tokenizer", help="tokenizer.json or its folder (default: beside the model, else the "
                                  "checkpoint it was exported from)"),
    fp16_sim: bool = typer.Option(False, "--fp16-sim", help="run the model (not the reference) in fp16 "
                                                            "simulation, as the card computes"),
    window: Optional[int] = typer.Option(None, "--window", help="tokens per window (default 128, at most "
                                         "ctx_len + 1 for a KV model)", callback=_count(low=2)),
    context: Optional[int] = typer.Option(None, "--context", help="tokens of each window that are only context "
                                          "(default: a quarter of the window)", callback=_count()),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="evaluate only the text's first N tokens",
                                             callback=_count(low=2)),
    ctx_len: Optional[int] = typer.Option(None, "--ctx-len", help="cache length of a KV model whose manifest "
                                          "does not say it", callback=_count()),
    json_path: Optional[Path] = typer.Option(None, "--json", help="also write the result as JSON (- for stdout)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no table, no progress bar"),
) -> None:
    """Perplexity of a model on a text, and with --reference its top-1 agreement and KL divergence:
    what a pass combination cost. KV models run as deployed (chunked prefill, decode with the cache)."""
    import json as json_module

    from qeff.evaluation import evaluate

    to_stdout = json_path is not None and str(json_path) == "-"
    if json_path is not None and not to_stdout:
        from qeff.common.paths import check_output_file, model_files

        inputs = [*model_files(model), *(model_files(reference) if reference else ()),
                  *(p for p in (text, tokenizer) if p is not None)]
        check_output_file(json_path, "--json", inputs)
    result = evaluate(model, reference=reference, text=text, tokenizer=tokenizer, fp16_sim=fp16_sim, window=window,
                      context=context, max_tokens=max_tokens, ctx_len=ctx_len, progress=not quiet and not to_stdout)
    payload = json_module.dumps(result.to_dict(), indent=2) + "\n"
    if to_stdout:
        sys.stdout.write(payload)
    elif not quiet:
        console.print(result.rich_table())
        if result.nonfinite:
            console.print(f"[bold red]{result.nonfinite} scored positions had NaN or Inf logits[/]")
    if json_path is not None and not to_stdout:
        from qeff.common.atomic import write_text_atomic

        write_text_atomic(json_path, payload)


@app.command("demo")
def demo_command(
    arch: Optional[str] = typer.Option(
        None, "--arch", help="a tiny architecture with random weights (e.g. llama) instead of the reference model"),
    exporter: str = typer.Option("torchscript", "--exporter", help="dynamo or torchscript"),
    workdir: Path = typer.Option(Path("qeff-demo"), "--workdir", help="where the demo writes its files"),
    passes: str = typer.Option("cleanup,fold,kv,fixed,fp16clip,mxfp6", "--passes", help="passes to run"),
    ctx_len: Optional[int] = typer.Option(
        None, "--ctx-len", help="cache length for the kv pass (default 64; only with a pass that takes it)"
    , callback=_count()),
    encoder: bool = typer.Option(False, "--encoder", help="the encoder flow instead: tiny BERT for question answering"),
) -> None:
    """Export the reference model, rewrite it, verify it, generate text with it and measure what each
    step cost: the whole flow on one screen (--arch: a tiny random model instead)."""
    if workdir.exists() and not workdir.is_dir():
        raise QeffError(f"--workdir {workdir} is a file", "give a folder (it is created when missing)")
    if encoder:
        from qeff.demo_encoder import run_encoder_demo

        run_encoder_demo(workdir=workdir if workdir != Path("qeff-demo") else Path("qeff-demo-encoder"),
                         console=console)
        return
    if arch is None:
        from qeff.demo_reference import run_reference_demo

        run_reference_demo(exporter=exporter, workdir=workdir, passes=passes, ctx_len=ctx_len, console=console)
        return
    from qeff.demo import run_demo

    run_demo(arch=arch, exporter=exporter, workdir=workdir, passes=passes, ctx_len=ctx_len, console=console)


def main() -> None:
    _run_app(app, "qeff")


if __name__ == "__main__":
    main()
