"""Own DDP (bucketed, naive), torch DDP, ZeRO-1/2 and FSDP2 on 2 gloo processes against one process
training on the concatenated batch.

Tolerances: the ranks' gradient sums are the single-process sums added in another order (per-rank
partial sums, then the all-reduce), so synchronized gradients must equal the single-process ones to
fp32 rounding: rtol 1e-5, atol 1e-7. Parameters after 3 AdamW steps are looser: Adam divides by
sqrt(v), so for an element whose gradient is ~0 (cancellation) the update m/(sqrt(v)+eps) amplifies
that rounding; a few elements differ by up to ~2e-5 (observed). atol 1e-4 (1% of one step's maximal
move, lr = 1e-2) still fails any real error: a missing or doubled rank contribution moves elements
by ~1e-2. The two replicas must be bit-identical (they apply the same reduced gradient).
"""

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed import workers as w


def close(a: dict, b: dict, rtol=1e-5, atol=1e-4):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def run(spawned):
    out, _, infos = spawned
    info = [i["equivalence"] for i in infos]

    def params(name, rank=0):
        return load_file(str(out / f"{name}.rank{rank}.safetensors"))

    return info, params


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)
    model, _ = w.tiny_model(seed=0)
    grads: dict = {}
    losses = w.train_steps(model, w.adamw(model), grads=grads)
    adamw = w.params_of(model)
    model, _ = w.tiny_model(seed=0)
    w.train_steps(model, w.muon(model))
    return {"adamw": adamw, "losses": losses, "muon": w.params_of(model), "grads": grads}


@pytest.mark.parametrize("name", ["bucketed", "naive", "torch_ddp", "accum", "zero1_adamw", "zero2_adamw",
                                  "views_zeroed", "views_none"])
def test_equals_single_process_adamw(run, reference, name):
    _, params = run
    assert all(torch.equal(params(name, 0)[k], params(name, 1)[k]) for k in params(name, 0))  # replicas
    close(params(name), reference["adamw"])


@pytest.mark.parametrize("name", ["bucketed", "naive", "accum", "zero1_adamw", "zero2_adamw", "zero1_muon",
                                  "views_zeroed", "views_none"])
def test_synchronized_gradients_equal_single_process(run, reference, name):
    _, params = run
    grads = {**params(f"{name}_grad", 1), **params(f"{name}_grad", 0)}  # ZeRO-2: each rank has its part
    close(grads, reference["grads"], rtol=1e-5, atol=1e-7)
    if name != "zero2_adamw":
        assert params(f"{name}_grad", 0).keys() == params(f"{name}_grad", 1).keys() == grads.keys()
    else:
        assert not params(f"{name}_grad", 0).keys() & params(f"{name}_grad", 1).keys()


def test_own_ddp_equals_torch_ddp(run):
    _, params = run
    close(params("bucketed"), params("torch_ddp"))


def test_losses_and_broadcast(run, reference):
    info, _ = run
    # ranks started from different random weights; the mean of the two ranks' losses is the global one
    mean = [(a + b) / 2 for a, b in zip(info[0]["bucketed_losses"], info[1]["bucketed_losses"])]
    assert mean == pytest.approx(reference["losses"], rel=1e-5)


def test_zero1_muon_equals_unsharded_muon(run, reference):
    _, params = run
    close(params("zero1_muon"), reference["muon"])


def test_zero_shards_state(run):
    info, _ = run
    model, _ = w.tiny_model(seed=0)
    opt = w.adamw(model)
    full = 2 * sum(p.numel() * 4 for p in model.parameters())  # exp_avg + exp_avg_sq, fp32
    per_rank = [i["zero1_adamw_state_bytes"] for i in info]
    assert sum(per_rank) == full and max(per_rank) <= 0.6 * full  # disjoint shards, balanced
    assert opt is not None
    assert [i["zero2_foreign_grads"] for i in info] == [0, 0]
    assert all(i["zero2_owned_with_grad"] > 0 for i in info)


def hand_packed(model, first_cap: int, cap: int) -> list[list[str]]:
    """Greedy packing by hand, in reverse registration order; the first bucket has its own cap."""
    expected, current, used = [], [], 0
    for n, p in reversed(list(model.named_parameters())):
        limit = first_cap if not expected else cap
        if current and (used + p.numel()) * 4 > limit:
            expected.append(current)
            current, used = [], 0
        current.append(n)
        used += p.numel()
    return expected + [current]


def test_bucket_boundaries(run):
    info, _ = run
    model, _ = w.tiny_model(seed=0)
    cap = int(w.BUCKET_MB * 2**20)
    expected = hand_packed(model, cap, cap)
    assert info[0]["buckets"] == expected and len(expected) > 3
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    assert info[0]["bucket_numels"] == [sum(sizes[n] for n in b) for b in expected]
    assert info[0]["slots_aligned"]  # every gradient view starts on a 16-byte boundary
    # a smaller first bucket (torch DDP's 1 MB) so the first all-reduce starts early
    small = hand_packed(model, int(w.BUCKET_MB / 4 * 2**20), cap)
    assert info[0]["buckets_small_first"] == small and len(small[0]) < len(expected[0])


def test_buckets_launch_during_backward(run):
    info, _ = run
    launched = info[0]["launched_before_last"]
    # every bucket but the one holding the embedding (the last, launched at the end) was in flight
    assert launched[:-1] == [True] * (len(launched) - 1) and launched[-1] is False


@pytest.mark.parametrize("name", ["views_zeroed", "views_none"])
def test_gradients_are_views_of_persistent_buckets(run, name):
    info, _ = run
    for rank in (0, 1):
        got = info[rank][name]
        # after every synchronized backward each p.grad is its bucket slot, and the buckets are the
        # same tensors on every step (allocated once; rebuilt once, inside the first backward)
        assert [s["slots"] for s in got["steps"]] == [True] * 3
        assert got["steps"][0]["buffers"] == got["steps"][1]["buffers"] == got["steps"][2]["buffers"]
        assert got["host_sync_calls"] == []  # nothing in ddp.py waits for the device (on CUDA)
        n = len(got["initial"])
        if name == "views_zeroed":  # zero_grad() zeroes the buckets: autograd adds into them, no copy
            assert got["into_bucket"] == [True] * (2 * n * 3)
        else:  # set_to_none: the first micro-step's gradient is copied in, the second adds in place
            assert got["into_bucket"] == ([False] * n + [True] * n) * 3


def test_buckets_rebuilt_in_gradient_ready_order(run):
    info, _ = run
    for name, order_key in (("views_zeroed", "sync_order"), ("scrambled", "ready")):
        ranks = [i[name] for i in info]
        order = ranks[0][order_key]  # rank 0's order is broadcast: every rank packs the same buckets
        assert ranks[0]["rebuilt"] == ranks[1]["rebuilt"] == order
        assert sorted(order) == sorted(ranks[0]["initial"])
    scrambled = info[0]["scrambled"]  # registered (last, first, mid), used first -> mid -> last
    assert scrambled["initial"] != scrambled["ready"]
    assert [n.split(".")[0] for n in scrambled["rebuilt"]][::2] == ["last", "mid", "first"]


def test_no_sync_skips_communication(run):
    info, _ = run
    assert info[0]["no_sync_grads_differ"]


def test_unused_and_tied_parameters(run):
    info, params = run
    torch.manual_seed(0)
    model = w.PartlyUsed()
    w.partly_used_reference(model, w.adamw(model))
    ref = w.params_of(model)
    close(params("unused"), ref)
    close(params("unused", 1), ref)
    assert info[0]["never_grad_is_none"] and info[1]["never_grad_is_none"]
    assert info[0]["odd_slots_aligned"]
    torch.manual_seed(0)
    assert torch.equal(params("unused")["never.weight"], w.PartlyUsed().never.weight)  # never stepped
    # the same through zero_grad() (zeroed buckets instead of grad = None between steps)
    close(params("unused_zeroed"), ref)
    close(params("unused_zeroed", 1), ref)
    assert info[0]["never_grad_is_none_zeroed"] and info[1]["never_grad_is_none_zeroed"]


def test_fsdp2_equals_unsharded(run, reference):
    info, params = run
    close(params("fsdp"), reference["adamw"])
    # each rank's loss is on its rows; their mean is the global loss
    mean = [(a + b) / 2 for a, b in zip(info[0]["fsdp_losses"], info[1]["fsdp_losses"])]
    assert mean == pytest.approx(reference["losses"], rel=1e-5)
    bf16 = [(a + b) / 2 for a, b in zip(info[0]["fsdp_bf16_losses"], info[1]["fsdp_bf16_losses"])]
    assert info[0]["fsdp_bf16_master_dtype"] == "torch.float32"
    # bf16 compute: same trajectory within bf16 rounding (~3 significant digits)
    assert bf16 == pytest.approx(reference["losses"], rel=2e-2) and bf16[-1] < bf16[0]


def test_ranks_that_disagree_are_named(run):
    info, _ = run
    for i in info:
        assert "ranks disagree on train config" in i["disagree_error"] and "[[0], [1]]" in i["disagree_error"]


def test_moe_load_counts_summed_over_ranks(run):
    info, _ = run
    # rank r holds [1,2,3]*(r+1) + layer index: the sum over 2 ranks is [3,6,9] + 2*layer
    expected = [[3.0 + 2 * i, 6.0 + 2 * i, 9.0 + 2 * i] for i in range(2)]
    assert info[0]["moe_load_counts"] == info[1]["moe_load_counts"] == expected


@pytest.mark.slow
def test_four_ranks_equal_single_process(tmp_path, reference):
    w.spawn("four", tmp_path, 4)
    for name in ("bucketed", "naive", "accum", "zero1_adamw", "zero2_adamw"):
        got = [load_file(str(tmp_path / f"{name}.rank{r}.safetensors")) for r in range(4)]
        assert all(torch.equal(got[0][k], g[k]) for g in got[1:] for k in got[0])
        close(got[0], reference["adamw"])


@pytest.mark.slow
def test_own_ddp_under_torch_compile(tmp_path, reference):
    info = w.spawn("compiled", tmp_path, 2)
    for name in ("compiled_blocks", "compiled_model"):
        for rank in (0, 1):
            close(load_file(str(tmp_path / f"{name}.rank{rank}.safetensors")), reference["adamw"])
    # per-block graphs: the blocks' buckets are in flight before the embedding's gradient arrives
    assert any(info[0]["compiled_blocks"]["launched_before_last"])
