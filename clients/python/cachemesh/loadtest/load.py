"""One bounded load run: the warm-up, then the measured plan, in one or several processes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import replace

import grpc

from cachemesh._channel import GATEWAY_SERVICE
from cachemesh._tls import Tls, is_local, sync_channel
from cachemesh.loadtest.progress import Progress
from cachemesh.loadtest.runner import Interrupted, LoadShape, log, run_plan, run_processes
from cachemesh.loadtest.samples import LOST, Sample
from cachemesh.loadtest.workloads import Item, Workload


class NotLoopback(ValueError):
    """The target is not a loopback address and the caller did not allow it."""


def check_target(target: str, allow_remote: bool) -> None:
    """Refuses a target off this host unless ``allow_remote`` (``--allow-non-loopback``): one
    neither loopback nor a Unix socket (``_tls.is_local``, the clients' rule)."""
    if not is_local(target) and not allow_remote:
        raise NotLoopback(
            f"--target {target}: the load test only targets this host (loopback: "
            "127.0.0.0/8, ::1, localhost; or a Unix socket: unix:, unix-abstract:); pass "
            "--allow-non-loopback to load a stack you own elsewhere"
        )


class NoGateway(ValueError):
    """Nothing at the target answers as a serving Gateway."""


HEALTH_CHECK = "/grpc.health.v1.Health/Check"
PROBE_S = 3.0  # a Gateway restarting within this is waited for
SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}


def check_gateway(target: str, tls: Tls | None = None, timeout_s: float = PROBE_S) -> None:
    """Asks the target's grpc.health.v1 whether the Gateway serves, within ``timeout_s``: a
    run against a stack that is not up would wait out its deadline, then report every request
    cut at it (as if they had reached a stack). The messages are encoded by hand: the client
    package does not depend on grpcio-health-checking. ``tls``: as the run's channels."""
    name = GATEWAY_SERVICE.encode()
    request = b"\x0a" + bytes([len(name)]) + name  # HealthCheckRequest{service: name}
    with sync_channel(target, tls) as channel:
        check: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(HEALTH_CHECK)
        try:
            reply = check(request, timeout=timeout_s, wait_for_ready=True)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED):
                raise NoGateway(
                    f"{target} answers gRPC but serves no Gateway (another service's "
                    "address? make status lists the router's)"
                ) from None
            if tls is not None:  # a plaintext Gateway, or a certificate not trusted
                raise NoGateway(
                    f"no Gateway at {target} answers over TLS (make up? a plaintext Gateway? "
                    "the CA file, or the client certificate it asks for?)"
                ) from None
            raise NoGateway(f"no Gateway at {target} (make up?)") from None
    if reply != SERVING:
        raise NoGateway(f"the Gateway at {target} is not serving (make status)")


def draw(workload: Workload, count: int) -> list[Item]:
    return [workload.next_item() for _ in range(count)]


def warm_up(
    target: str, keys: dict[str, str], warmup: Sequence[Item], shape: LoadShape, label: str
) -> list[Sample]:
    """The unrecorded requests sent before a run, closed loop at the shape's concurrency;
    their samples are marked (they still teach which answer came from which question)."""
    if not warmup:
        return []
    bar = Progress(f"{label} warm-up", len(warmup))
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        bar(done)

    closed = replace(shape, mode="closed")
    short = "interrupted"
    try:
        samples = asyncio.run(run_plan(target, keys, warmup, closed, warmup=True, tick=tick))
        short = ended_short(bar, shape)
        return samples
    finally:
        bar.close(short)


def ended_short(bar: Progress, shape: LoadShape, samples: Sequence[Sample] = ()) -> str:
    """Why a run that was not interrupted ended before its last request: a client process
    lost, else ``--duration`` reached (its time run out on the bar's clock), else what the
    warnings above said (the open loop's in-flight bound)."""
    if any(sample.code == LOST for sample in samples):
        return "a client process was lost (see the warning)"
    if bar.elapsed_s >= shape.duration_s:
        return f"--duration {shape.duration_s:g} s reached: the rest was not sent"
    return "stopped before the plan's end (see the warnings above)"


def run_load(
    target: str,
    keys: dict[str, str],
    warmup: Sequence[Item],
    plan: Sequence[Item],
    shape: LoadShape,
    processes: int = 1,
    label: str = "load",
    *,
    before_measured: Callable[[], None] = lambda: None,
    warn: Callable[[str], None] = log.warning,
) -> list[Sample]:
    """Warm-up samples (marked) followed by the measured ones; ``before_measured`` runs between
    (the billed totals read before the measured requests); ``warn`` is told what the report
    must say (a client process lost). Interrupted (Ctrl-C), it raises ``Interrupted`` with
    every sample taken (the measured requests not sent are not run)."""
    samples: list[Sample] = []
    try:
        samples += warm_up(target, keys, warmup, shape, label)
        try:
            before_measured()
        except KeyboardInterrupt:
            raise Interrupted([]) from None
        bar = Progress(label, len(plan))
        short, measured = "interrupted", []  # as if cut before it sent a request
        try:
            if processes <= 1:
                count = 0

                def step() -> None:
                    nonlocal count
                    count += 1
                    bar(count)

                run = run_plan(target, keys, plan, shape, seed=shape.seed, tick=step)
                measured = asyncio.run(run)
            else:
                measured = run_processes(target, keys, plan, shape, processes, bar, warn)
            samples += measured
            short = ended_short(bar, shape, measured)
        finally:
            bar.close(short)
    except Interrupted as interrupted:
        raise Interrupted([*samples, *interrupted.samples]) from None
    return samples
