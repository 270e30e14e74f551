"""SyncCounter: dispatched-op and host-sync counting (flexitrain/utils/dispatch_count.py)."""
from __future__ import annotations

import os

import pytest
import torch

from flexitrain.utils.dispatch_count import CudaSyncDebug, SyncCounter, count_syncs

THIS = "tests/test_dispatch_count.py"


def _with_item(x):
    y = x * 2
    return y.sum().item()  # the sync this test expects to be located


def _pure(x, w):
    h = torch.tanh(x @ w)
    mask = (h > 0).float()
    return (h * mask).sum(-1).softmax(-1)


def test_item_counts_once_with_its_location():
    with SyncCounter(roots=[os.path.dirname(__file__)]) as c:
        _with_item(torch.randn(4))
    assert c.syncs == 1, c.report()
    ev = c.events[0]
    assert ev.kind == "Tensor.item"
    line = next(i for i, text in enumerate(open(__file__).read().splitlines(), 1) if "return y.sum().item()" in text)
    assert ev.location.startswith(f"{THIS}:{line} in _with_item"), ev.location
    assert c.ops >= 3  # mul, sum, _local_scalar_dense


def test_default_root_is_flexitrain_with_fallback_to_the_caller():
    with SyncCounter() as c:
        _with_item(torch.randn(4))
    assert c.syncs == 1
    assert c.events[0].location.startswith(THIS)  # no flexitrain frame: innermost non-torch frame


def test_tolist_of_three_elements_counts():
    with SyncCounter() as c:
        values = torch.tensor([1, 2, 3]).tolist()
    assert values == [1, 2, 3]
    assert c.syncs >= 1 and c.sync_counts["Tensor.tolist"] == 1, c.report()


def test_pure_tensor_function_counts_zero():
    x, w = torch.randn(3, 5, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    with SyncCounter() as c:
        _pure(x, w).pow(2).sum().backward()
    assert c.syncs == 0, c.report()
    assert c.ops > 5  # forward and backward ops were seen
    assert c.op_counts["mm"] >= 3  # x @ w forward + two grads


def test_nonzero_and_data_dependent_ops_count():
    x = torch.tensor([0.0, 1.0, 2.0, 0.0])
    with SyncCounter() as c:
        torch.nonzero(x)
    assert c.syncs == 1 and c.sync_counts["aten.nonzero"] == 1, c.report()
    with SyncCounter() as c:
        x[x > 0]                      # boolean-mask indexing: shape depends on the data
        torch.masked_select(x, x > 0)
        torch.unique(x)
        torch.repeat_interleave(torch.tensor([1, 2]))
    assert c.syncs == 4, c.report()


def test_python_scalar_conversions_and_truth_tests_count():
    n = torch.tensor(3)
    x = torch.arange(6.0)
    with SyncCounter() as c:
        float(n)
        int(n)
        bool(n)
        if n > 2:
            pass
        x[:n]                         # a tensor slice bound (__index__-like)
        range(n)                      # __index__
        f"{x.sum():.1f}"              # __format__ -> _local_scalar_dense
        x.numpy()
        x.cpu()
        x.to("cpu")
        torch.tensor([x[0], x[1]])    # a list of tensors read back
        torch.equal(x, x)
    assert c.syncs == 12, c.report()
    kinds = c.sync_counts
    assert kinds["Tensor.__float__"] == kinds["Tensor.__int__"] == 1
    assert kinds["Tensor.__bool__"] == 2
    assert kinds["Tensor.cpu"] == kinds["Tensor.numpy"] == kinds["Tensor.to('cpu')"] == 1


def test_cpu_as_device_false_ignores_host_only_calls():
    x = torch.arange(4.0)
    with SyncCounter(cpu_as_device=False) as c:
        x.cpu().tolist()
        x.item() if x.numel() == 1 else None
        float(x.sum())
        torch.nonzero(x)
    assert c.syncs == 0, c.report()
    assert c.ops > 0


def test_to_device_attribute_is_not_a_sync_on_cpu():
    x, y = torch.arange(4.0), torch.zeros(1)
    with SyncCounter() as c:
        x.to(y.device)
        x.to(torch.float64)
        x.to(y)
    assert c.syncs == 0, c.report()


def test_report_assert_and_helper():
    out, c = count_syncs(_with_item, torch.ones(2))
    assert out == 4.0
    assert "1 host syncs" in c.report()
    with pytest.raises(AssertionError, match="Tensor.item at tests/test_dispatch_count.py"):
        c.assert_no_syncs()
    c.assert_no_syncs(allow=lambda e: e.kind == "Tensor.item")


def test_sync_in_flexitrain_code_is_located_there():
    from flexitrain.data.batching import lengths_to_mask

    with SyncCounter() as c:
        lengths_to_mask(torch.tensor([3, 5]))  # no explicit length: int(lengths.max()) reads it back
    assert c.syncs == 1, c.report()
    assert c.events[0].location.startswith("flexitrain/data/batching.py:"), c.events[0]
    assert c.events[0].stack[-1].startswith(THIS)  # the chain of repository frames reaches the caller


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_counts_match_sync_debug_mode():
    x = torch.arange(8.0, device="cuda")
    with SyncCounter(cpu_as_device=False, cuda_sync_debug=True) as c:
        x.sum().item()
        x.cpu()
        torch.nonzero(x)
        (x * 2).sum(-1)
    assert c.syncs == 3, c.report()
    assert len(c.cuda_sync_warnings) >= 3, c.report()
    with CudaSyncDebug() as d:
        (x * 2).sum(-1)
    assert d.count == 0


def _masked_loss(x):
    return x[x > 0].sum()  # boolean-mask indexing: a sync forward and (index_put_) backward


def test_backward_sync_is_located_at_its_forward_line():
    x = torch.randn(6, requires_grad=True)
    with SyncCounter(roots=[os.path.dirname(__file__)]) as c:
        _masked_loss(x).backward()
    kinds = c.sync_counts
    assert kinds["aten.index(bool mask)"] == 1, c.report()
    back = [e for e in c.events if "backward of IndexBackward" in e.kind]
    assert len(back) == 1, c.report()
    assert back[0].location.startswith(f"{THIS}:") and back[0].location.endswith("in _masked_loss"), back[0]


def test_optimizer_step_counters_are_host_only():
    w = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.pow(2).sum().backward()
    with SyncCounter() as c:
        opt.step()
    assert c.syncs == 0, c.report()
    assert sum(c.host_only.values()) >= 1  # AdamW read its CPU `step` tensor


def test_reads_before_the_batch_transfer_are_host_only():
    def on_before_batch_transfer(batch):
        return int(batch["lengths"].max())  # the host copy of the batch: no device involved

    with SyncCounter() as c:
        on_before_batch_transfer({"lengths": torch.tensor([3, 4])})
    assert c.syncs == 0 and sum(c.host_only.values()) == 1, c.report()
