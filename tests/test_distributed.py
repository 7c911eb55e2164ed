"""Context parallelism (lln.distributed) against the single-process ops, in gloo processes.

The test spawns P processes (gloo, file rendezvous); each takes its contiguous slice of a
sequence, runs the context-parallel op and backward with its slice of a fixed output
gradient, and saves its outputs, its q/k/v gradients and (last rank) the continuation of
decoding from its final state. The parent compares them with one single-process call:
relative error <= 1e-10 in float64 and <= 1e-5 in float32 (outputs and gradients). Strict
causality: scaling the last rank's q, k by 1e3 and v by 1e8 leaves every earlier rank's
outputs bit for bit unchanged.

The default suite runs one spawn of 2 processes; the 3-process matrix is marked slow.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_qkv, padding_mask, rel_err

import lln.distributed as lln_dist
from lln.ops import lln_attention, lln_diag_attention

B, H, D, DV = 2, 3, 8, 6
EXTRA = 5  # tokens decoded after the context-parallel prefill
#: bf16: outputs are rounded to bf16 (2^-8 relative) by both calls, so one rounding step
#: apart where the float32 sums differ in their last bits
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _case(op="lln", bounds=(0, 70, 150), dtype=torch.float64, fixed=False,
          masked=True, chunk_size=16, block_size=12, stats="head", huge=False,
          prefix=0, mismatch=False, checkpoint=False, seed=0):
    return dict(op=op, n=bounds[-1], bounds=bounds, dtype=dtype, fixed=fixed, masked=masked,
                chunk_size=chunk_size, block_size=block_size, stats=stats, huge=huge,
                prefix=prefix, mismatch=mismatch, checkpoint=checkpoint, seed=seed)


def _inputs(case):
    total = case["prefix"] + case["n"] + EXTRA
    q, k, v = make_qkv(B, H, total, D, DV, dtype=case["dtype"], seed=case["seed"])
    mask = padding_mask(B, total, seed=case["seed"]) if case["masked"] else None
    g = torch.Generator().manual_seed(case["seed"] + 1)
    grad = torch.randn(B, H, case["n"], DV, generator=g, dtype=torch.float64).to(case["dtype"])
    return q, k, v, mask, grad


def _kwargs(case):
    kw = dict(is_causal=True, chunk_size=case["chunk_size"], stats=case["stats"],
              checkpoint=case["checkpoint"])
    if case["op"] == "lln_diag":
        kw["block_size"] = case["block_size"]
    if case["fixed"]:
        beta = torch.tensor([0.6, 0.9, 1.2], dtype=case["dtype"]).view(1, H, 1, 1)
        kw.update(alpha=0.8, beta=beta)
    return kw


def _split(t, lo, hi, dim):
    return None if t is None else t.narrow(dim, lo, hi - lo)


def _prefix_state(case, q, k, v, mask, fn, kw):
    """The single-process state after ``prefix`` tokens (None without a prefix)."""
    p = case["prefix"]
    if not p:
        return None
    _, state = fn(q[:, :, :p], k[:, :, :p], v[:, :, :p], key_padding_mask=_split(mask, 0, p, 1),
                  output_final_state=True, **kw)
    return state.detach()


def _run_case(case, rank, world):
    q, k, v, mask, grad = _inputs(case)
    kw = _kwargs(case)
    single = lln_attention if case["op"] == "lln" else lln_diag_attention
    fn = lln_dist.lln_attention if case["op"] == "lln" else lln_dist.lln_diag_attention
    base = _prefix_state(case, q, k, v, mask, single, kw)
    p, n = case["prefix"], case["n"]
    lo, hi = p + case["bounds"][rank], p + case["bounds"][rank + 1]
    if case["mismatch"]:
        try:
            fn(q[rank:, :, lo:hi], k[rank:, :, lo:hi], v[rank:, :, lo:hi], **kw)
        except ValueError as err:
            return {"error": str(err)}
        return {"error": None}
    ql, kl, vl = (t[:, :, lo:hi].clone().requires_grad_() for t in (q, k, v))
    if case["huge"] and rank == world - 1:
        ql, kl, vl = (ql * 1e3).detach(), (kl * 1e3).detach(), (vl * 1e8).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # huge inputs may underflow rows of the last rank
        out, state = fn(ql, kl, vl, key_padding_mask=_split(mask, lo, hi, 1),
                        initial_state=base, output_final_state=True, **kw)
    result = {"out": out.detach()}
    if case["huge"]:
        return result
    out.backward(grad[:, :, lo - p : hi - p])
    result.update(dq=ql.grad, dk=kl.grad, dv=vl.grad, position=state.position)
    if rank == world - 1:  # continue decoding from the prefill's final state
        end = p + n
        tail = (t[:, :, end:].detach() for t in (q, k, v))
        result["decoded"] = single(*tail, key_padding_mask=_split(mask, end, end + EXTRA, 1),
                                   initial_state=state.detach(), **kw)
    return result


def _worker(rank, world, init_file, cases, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        lln_dist.communication.reset()
        results = [_run_case(case, rank, world) for case in cases]
        torch.save({"results": results, "bytes": lln_dist.communication.forward},
                   f"{out_dir}/{rank}.pt")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _spawn(tmp_path, world, cases):
    mp.spawn(_worker, args=(world, str(tmp_path / "rendezvous"), cases, str(tmp_path)),
             nprocs=world, join=True)
    return [torch.load(tmp_path / f"{r}.pt") for r in range(world)]


def _reference(case):
    q, k, v, mask, grad = _inputs(case)
    kw = _kwargs(case)
    fn = lln_attention if case["op"] == "lln" else lln_diag_attention
    base = _prefix_state(case, q, k, v, mask, fn, kw)
    p, n = case["prefix"], case["n"]
    ql, kl, vl = (t[:, :, p : p + n].clone().requires_grad_() for t in (q, k, v))
    out = fn(ql, kl, vl, key_padding_mask=_split(mask, p, p + n, 1), initial_state=base, **kw)
    out.backward(grad)
    # decoding after the whole prefill, by one single-process call over prefill + tail
    full = fn(q[:, :, p:], k[:, :, p:], v[:, :, p:],
              key_padding_mask=_split(mask, p, p + n + EXTRA, 1), initial_state=base, **kw)
    return dict(out=out.detach(), dq=ql.grad, dk=kl.grad, dv=vl.grad, decoded=full[:, :, n:])


def _check(cases, per_rank):
    world = len(per_rank)
    for i, case in enumerate(cases):
        results = [r["results"][i] for r in per_rank]
        if case["mismatch"]:
            for res in results:
                assert res["error"] is not None and "on every rank" in res["error"], res
            continue
        if case["huge"]:
            plain = next(j for j, c in enumerate(cases) if not c["huge"] and all(
                c[key] == case[key] for key in case if key not in ("huge",)))
            for r in range(world - 1):
                assert torch.equal(results[r]["out"], per_rank[r]["results"][plain]["out"]), r
            assert not torch.equal(
                results[-1]["out"], per_rank[-1]["results"][plain]["out"]
            )  # the change was real
            continue
        ref = _reference(case)
        tol = TOL[case["dtype"]]
        for name in ("out", "dq", "dk", "dv"):
            got = torch.cat([res[name] for res in results], 2)
            assert got.dtype == case["dtype"]
            assert rel_err(got, ref[name]) <= tol, (i, case, name, rel_err(got, ref[name]))
        assert results[-1]["position"] == case["prefix"] + case["n"]
        assert rel_err(results[-1]["decoded"], ref["decoded"]) <= tol, (i, case)


FAST_CASES = [
    _case("lln"),  # moment matching, padding, 150 tokens = not a multiple of 2 * 16
    _case("lln_diag", bounds=(0, 77, 150)),  # the boundary cuts a diagonal block
    _case("lln_diag", bounds=(0, 77, 150), huge=True),
    _case("lln", dtype=torch.float32, fixed=True, masked=False, bounds=(0, 64, 150),
          checkpoint=True),
    _case("lln", mismatch=True),
]


def test_two_processes_equal_one(tmp_path):
    per_rank = _spawn(tmp_path, 2, FAST_CASES)
    _check(FAST_CASES, per_rank)
    # communication: per rank, O(B * H * D * Dv) numbers, independent of N
    assert per_rank[0]["bytes"] == per_rank[1]["bytes"] > 0


SLOW_CASES = [
    _case(op, dtype=dtype, fixed=fixed, masked=masked, bounds=bounds, stats=stats,
          chunk_size=chunk)
    for op in ("lln", "lln_diag")
    for dtype in (torch.float64, torch.float32)
    for fixed, masked, stats in ((False, True, "head"), (True, False, "head"),
                                 (False, False, "sequence"))
    for bounds, chunk in (((0, 50, 100, 150), 16), ((0, 40, 45, 131), 8))
] + [
    _case("lln", bounds=(0, 1, 2, 9), chunk_size=4),  # one-token shards
    _case("lln_diag", bounds=(0, 3, 5, 40), block_size=16),  # halo over two ranks
    _case("lln_diag", prefix=21, bounds=(0, 30, 50, 97)),  # continues a state
    _case("lln_diag", bounds=(0, 1030, 1100, 2100), chunk_size=32, checkpoint=True),
    _case("lln", prefix=13, fixed=True, bounds=(0, 30, 50, 97)),
    _case("lln", dtype=torch.bfloat16, bounds=(0, 50, 100, 150)),
    _case("lln_diag", dtype=torch.bfloat16, bounds=(0, 40, 45, 131), chunk_size=8),
    _case("lln", huge=True, bounds=(0, 50, 100, 150)),
    _case("lln_diag", huge=True, bounds=(0, 40, 45, 131), chunk_size=8),
]


@pytest.mark.slow
def test_three_processes_equal_one(tmp_path):
    _check(SLOW_CASES, _spawn(tmp_path, 3, SLOW_CASES))


def test_needs_a_process_group_and_causal():
    q, k, v = make_qkv(1, 1, 4, 2)
    with pytest.raises(ValueError, match="is_causal must be True"):
        lln_dist.lln_attention(q, k, v, is_causal=False)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
            lln_dist.lln_diag_attention(q, k, v)
