"""The card backend of ``qeff tune``: compile each point's QPC, run it with ``qaic-runner``.

For a point (cores, mos, ols, batch size, instances, set size):

- **Compile** with :func:`qeff.backend_aic.compile_model` into
  ``WORKDIR/compiles/qpc-cores-C-mos-M-ols-O-bs-B`` — the define-symbol flow of models without a
  KV cache: the batch size sizes the batch symbol, ``define_symbols`` fix the others, plus
  ``-convert-to-fp16``, ``-stats-batchsize``, ``-multicast-weights`` when asked, and ``-mos``/``-ols``
  when searched or static. Points that share a QPC (they differ only in instances or set size)
  compile it once; the QPCs a round of the search needs compile ``parallel_compiles`` at a time.
  A compile with unchanged parameters is kept (``compile_model``'s hash).
- **Run** ``qaic-runner -t QPC -a INSTANCES -S SET_SIZE -d DEVICE --time SECONDS`` with latency
  profiling into ``WORKDIR/runs/<qpc name>-inst-A-set-S/``, one run at a time (the runs share
  the card). Inferences/s come from its stats line
  (``InferenceCnt N TotalDuration Nus BatchSize N Inf/Sec X``), the latency of one call from the
  ``totalRoundtripTime`` column of the ``aic-profiling-program-N-latency.txt`` files
  (:mod:`qeff.tune.latency`). The result is saved as ``result.json`` with what it was measured
  with (QPC hash, instances, set size, seconds, device); a later search that needs the same
  point reuses it instead of running again.
- A compile or a run that fails makes that point a failure (kept, with the reason and its log);
  the search goes on. A missing compiler or runner stops everything before the first compile.
"""

from __future__ import annotations

__all__ = ["AicSettings", "AicBackend", "find_runner", "DEFAULT_RUNNER", "STATS_LINE"]

import concurrent.futures
import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from qeff.errors import QeffError
from qeff.tune.latency import TOTAL, latency_stats
from qeff.tune.search import Measurement
from qeff.tune.space import Space

logger = logging.getLogger(__name__)

DEFAULT_RUNNER = "/opt/qti-aic/exec/qaic-runner"
STATS_LINE = re.compile(r"InferenceCnt\s+(\d+)\s+TotalDuration\s+(\d+)\s*us\s+BatchSize\s+(\d+)\s+"
                        r"Inf/Sec\s+([0-9.eE+-]+)")
RESULT_NAME = "result.json"
RUNNER_LOG = "runner.log"
# The first inferences of a run warm the queues up; their latencies stay out of the numbers.
PROFILING_START_ITER = 10
PROFILING_SAMPLES = 99999


def find_runner(explicit: str | None = None, *, required: bool = True) -> str:
    """``explicit`` (``--runner``), else ``$QAIC_RUNNER``, else the SDK's, else qaic-runner on PATH.
    Not found: a one-line error, or with ``required=False`` (a dry run) the SDK's path."""
    searched = []
    for given, what in ((explicit, "--runner"), (os.environ.get("QAIC_RUNNER"), "$QAIC_RUNNER")):
        if not given:
            continue
        path = os.path.expanduser(given)
        located = shutil.which(path) if os.sep not in path else (path if os.access(path, os.X_OK) else None)
        if located and os.path.isfile(located):
            return os.path.abspath(located)
        if what == "--runner":
            raise QeffError(f"--runner {given} is not an executable file", "give the path of qaic-runner, or use --dry-run")
        searched.append(f"{what}={given}")
    if os.path.isfile(DEFAULT_RUNNER) and os.access(DEFAULT_RUNNER, os.X_OK):
        return DEFAULT_RUNNER
    searched.append(DEFAULT_RUNNER)
    on_path = shutil.which("qaic-runner")
    if on_path:
        return os.path.abspath(on_path)
    searched.append("qaic-runner on PATH")
    if not required:
        return DEFAULT_RUNNER
    raise QeffError(f"no qaic-runner found (searched {', '.join(searched)})",
                    "install the Cloud AI SDK, point --runner or QAIC_RUNNER at qaic-runner, or use --dry-run "
                    "to print the plan without it")


@dataclasses.dataclass(frozen=True)
class AicSettings:
    """What every point of a card search shares."""

    model: Path
    workdir: Path
    seconds: float = 5.0
    device_id: int = 0
    parallel_compiles: int = 1
    define_symbols: Mapping[str, int] = dataclasses.field(default_factory=dict)
    multicast_weights: bool = True
    compiler: str | None = None
    runner: str | None = None
    hw_version: str | None = None
    extra_flags: tuple[str, ...] = ()
    compile_timeout: float | None = None


def _compile_name(config: Mapping[str, Any]) -> str:
    def part(value: Any) -> str:
        return "default" if value is None else str(value)

    return (f"qpc-cores-{config['cores']}-mos-{part(config['mos'])}-ols-{part(config['ols'])}"
            f"-bs-{config['batch-size']}")


def _compile_key(config: Mapping[str, Any]) -> tuple:
    return tuple(config[k] for k in ("cores", "mos", "ols", "batch-size"))


def _stop_group(process: subprocess.Popen) -> None:
    """Stop the runner and whatever it started (its own process group), then reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except OSError:
        process.kill()
    process.wait()


class AicBackend:
    """Compiles and runs points of an ``aic`` :class:`~qeff.tune.space.Space`."""

    def __init__(self, space: Space, settings: AicSettings,
                 on_result: Callable[[dict, Measurement], None] | None = None) -> None:
        self.space = space
        self.s = settings
        self.on_result = on_result
        self.compiles = 0  # QPCs compiled by this search (not kept from earlier ones)
        self._runner: str | None = None

    # -- commands -------------------------------------------------------------------------

    def compile_options(self, config: Mapping[str, Any], *, dry_run: bool = False):
        from qeff.backend_aic import CompileOptions

        batch = int(config["batch-size"])
        return CompileOptions(num_cores=int(config["cores"]), batch_size=batch, mos=config["mos"], ols=config["ols"],
                              define_symbols=dict(self.s.define_symbols), multicast_weights=self.s.multicast_weights,
                              stats_batchsize=batch, compiler=self.s.compiler, hw_version=self.s.hw_version,
                              extra_flags=tuple(self.s.extra_flags), dry_run=dry_run, timeout=self.s.compile_timeout)

    def compile_folder(self, config: Mapping[str, Any]) -> Path:
        return self.s.workdir / "compiles" / _compile_name(config)

    def run_folder(self, config: Mapping[str, Any]) -> Path:
        return (self.s.workdir / "runs" /
                f"{_compile_name(config)}-inst-{config['instances']}-set-{config['set-size']}")

    def run_command(self, runner: str, config: Mapping[str, Any]) -> list[str]:
        qpc = self.compile_folder(config).resolve() / "qpc"
        out = self.run_folder(config).resolve()
        return [runner, "-t", str(qpc), "-a", str(config["instances"]), "-S", str(config["set-size"]),
                "-d", str(self.s.device_id), "--time", f"{self.s.seconds:g}",
                "--aic-profiling-type", "latency", "--aic-profiling-out-dir", str(out),
                "--aic-profiling-start-iter", str(PROFILING_START_ITER),
                "--aic-profiling-num-samples", str(PROFILING_SAMPLES)]

    def qeff_compile_line(self, config: Mapping[str, Any], output: str = "qpc-best") -> str:
        """The ``qeff compile`` command that builds ``config``'s QPC."""
        args = ["qeff", "compile", str(self.s.model), "-o", output, "--num-cores", str(config["cores"]),
                "--batch-size", str(config["batch-size"])]
        for flag in ("mos", "ols"):
            if config[flag] is not None:
                args += [f"--{flag}", str(config[flag])]
        for name, value in self.s.define_symbols.items():
            args += ["--define-symbol", f"{name}={value}"]
        if self.s.multicast_weights:
            args.append("--multicast-weights")
        args += ["--stats-batchsize", str(config["batch-size"])]
        if self.s.compiler:
            args += ["--compiler", self.s.compiler]
        if self.s.hw_version:
            args += ["--hw-version", self.s.hw_version]
        args += [f"--flag={f}" for f in self.s.extra_flags]
        return shlex.join(args)

    def runner_line(self, config: Mapping[str, Any], output: str = "qpc-best") -> str:
        return shlex.join(["qaic-runner", "-t", f"{output}/qpc", "-a", str(config["instances"]),
                           "-S", str(config["set-size"]), "-d", str(self.s.device_id)])

    # -- dry run --------------------------------------------------------------------------

    def plan(self, points: Sequence[Mapping[str, int]]) -> list[str]:
        """Every compile command (the compile folders are written as ``qeff compile --dry-run``
        writes them, nothing is compiled) and every run command for ``points``."""
        from qeff.backend_aic import compile_model

        runner = find_runner(self.s.runner, required=False)
        lines: list[str] = []
        compiled: set[tuple] = set()
        for point in points:
            config = self.space.config(point)
            if _compile_key(config) not in compiled:
                compiled.add(_compile_key(config))
                result = compile_model(self.s.model, self.compile_folder(config),
                                       self.compile_options(config, dry_run=True))
                lines.append(result.command_text)
            lines.append(shlex.join(self.run_command(runner, config)))
        return lines

    # -- measuring ------------------------------------------------------------------------

    def check_model(self) -> None:
        """Refuse what no point could compile, before anything is: a KV model, a symbol without
        a value, a bad flag."""
        from qeff.backend_aic import read_model_info
        from qeff.backend_aic.options import resolve_options

        info = read_model_info(self.s.model)
        if info.has_kv:
            raise QeffError("qeff tune searches models without a KV cache (encoders and the like)",
                            "for a KV model use qeff compile and qeff run")
        first = self.space.initial[0] if self.space.initial else next(self.space.grid())
        resolve_options(self.compile_options(self.space.config(first)), info)

    def check_tools(self) -> str:
        """The compiler and the runner, found before anything is compiled; returns the runner."""
        from qeff.backend_aic import find_compiler

        if self._runner is None:
            find_compiler(self.s.compiler, required=True)
            self._runner = find_runner(self.s.runner, required=True)
        return self._runner

    def _compile(self, config: Mapping[str, Any]) -> tuple[str | None, str | None]:
        """(QPC hash, None) or (None, why it failed)."""
        from qeff.backend_aic import compile_model

        try:
            result = compile_model(self.s.model, self.compile_folder(config), self.compile_options(config))
        except QeffError as e:
            return None, e.one_line()
        if result.status == "compiled":
            self.compiles += 1
        logger.info("%s: %s (%s)", _compile_name(config), result.status, result.hash)
        return result.hash, None

    def evaluate(self, points: Sequence[Mapping[str, int]]) -> list[Measurement]:
        runner = self.check_tools()
        configs = [self.space.config(p) for p in points]
        unique = {_compile_key(c): c for c in configs}
        compiled: dict[tuple, tuple[str | None, str | None]] = {}
        workers = max(1, min(self.s.parallel_compiles, len(unique)))
        pool = concurrent.futures.ThreadPoolExecutor(workers)
        try:
            futures = {key: pool.submit(self._compile, c) for key, c in unique.items()}
            for key, future in futures.items():
                compiled[key] = future.result()
        finally:
            # An interrupt does not wait for compiles that have not started.
            pool.shutdown(wait=True, cancel_futures=True)
        out = []
        for config in configs:
            digest, error = compiled[_compile_key(config)]
            m = Measurement(error=f"compile: {error}") if error else self._measure(runner, config, digest)
            if self.on_result is not None:
                self.on_result(config, m)
            out.append(m)
        return out

    def _identity(self, runner: str, config: Mapping[str, Any], digest: str) -> dict[str, Any]:
        return {"qpc_hash": digest, "instances": config["instances"], "set_size": config["set-size"],
                "seconds": self.s.seconds, "device_id": self.s.device_id, "runner": runner}

    def _measure(self, runner: str, config: Mapping[str, Any], digest: str) -> Measurement:
        folder = self.run_folder(config)
        identity = self._identity(runner, config, digest)
        saved = _read_json(folder / RESULT_NAME)
        if saved.get("identity") == identity and isinstance(saved.get("measurement"), dict):
            fields = {k: v for k, v in saved["measurement"].items() if k in Measurement.__dataclass_fields__}
            return dataclasses.replace(Measurement(**fields), reused=True)
        if folder.exists():
            shutil.rmtree(folder)  # old latency files must not mix with this run's
        folder.mkdir(parents=True)
        command = self.run_command(runner, config)
        m = self._run(command, folder)
        m.details["command"] = shlex.join(command)
        (folder / RESULT_NAME).write_text(json.dumps({"identity": identity, "measurement": dataclasses.asdict(m)},
                                                     indent=2) + "\n")
        return m

    def _run(self, command: list[str], folder: Path) -> Measurement:
        log = folder / RUNNER_LOG
        # A run that hangs is stopped: --time plus generous room for loading the QPC.
        limit = self.s.seconds * 3 + 120
        with open(log, "wb") as f:
            try:
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                           cwd=folder, start_new_session=True)
            except OSError as e:
                raise QeffError(f"cannot start {command[0]}: {e.strerror or e}", "check --runner") from None
            try:
                process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                _stop_group(process)
                return Measurement(error=f"run: qaic-runner did not finish within {limit:g} s (log: {log})")
            finally:
                if process.returncode is None:
                    _stop_group(process)
        text = log.read_text(errors="replace")
        if process.returncode != 0:
            last = text.strip().splitlines()[-1] if text.strip() else ""
            return Measurement(error=f"run: qaic-runner exited {process.returncode}: {last[:200]} (log: {log})")
        match = STATS_LINE.search(text)
        if match is None:
            return Measurement(error=f"run: qaic-runner printed no stats line (log: {log})")
        count, duration_us, batch, rate = match.groups()
        m = Measurement(inf_per_s=float(rate), details={"inferences": int(count), "duration_us": int(duration_us),
                                                         "batch_size": int(batch)})
        files = sorted(folder.glob("aic-profiling-program-*-latency.txt"))
        if not files:
            m.details["latency"] = "no latency files"
            return m
        try:
            stats = latency_stats(files).stats()
        except QeffError as e:
            m.details["latency"] = e.one_line()
            return m
        total = stats.get(TOTAL)
        if total is not None:
            m.p50_ms, m.p90_ms, m.p99_ms = total["50%"], total["90%"], total["99%"]
        m.details["latency_files"] = len(files)
        return m


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
