"""EWC core on tiny models: Fisher, penalty, anchors file, head growth, online EWC, replay."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from training import ewc, ewc_state
from training.classification.extend import FitHistory
from training.classification.task import ClassificationTask
from training.classification.taskset import accuracy
from training.engine import Engine
from training.heads import HeadRowFreeze, grow_linear
from training.metrics import plot_forgetting
from training.replay import mix_replay, replay_count, select_exemplars


def _grow(model, n):
    """Head growth of a non-registry model: the Linear at ``head.1``."""
    model.head[1] = grow_linear(model.head[1], n)
    return "head.1"


def _fit(model, loader, *, epochs, optimizer, penalty=None, bn="frozen", after_step=None):
    """Train through the one engine; a FitHistory of per-step task loss and penalty."""
    eng = Engine(
        task=ClassificationTask(),
        bn_frozen=bn == "frozen",
        terms=[penalty] if penalty is not None else [],
        after_step=[after_step] if after_step is not None else [],
    )
    hist = FitHistory()
    for e in range(epochs):
        hist.add(e, eng.run_epoch(model, loader, optimizer))
    model.eval()
    return hist


def _logreg_data(n=24, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 1.5, torch.randint(0, 2, (n,), generator=g)


def _closed_form_fisher(model: nn.Linear, x: torch.Tensor) -> dict[str, torch.Tensor]:
    # d log p_y / d z_k = 1[y=k] - p_k, so E_{y~p}[(.)^2] = p_k (1 - p_k):
    #   F_W[k, j] = mean_x p_k(1-p_k) x_j^2,  F_b[k] = mean_x p_k(1-p_k)
    with torch.no_grad():
        p = torch.softmax(model(x).double(), 1)
    v = p * (1 - p)  # (N, C)
    return {
        "weight": (v.unsqueeze(2) * x.double().pow(2).unsqueeze(1)).mean(0),
        "bias": v.mean(0),
    }


class TinyNet(nn.Module):
    """Conv + BN + dropout + linear head: the parts EWC has to cope with."""

    def __init__(self, num_classes=2):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, num_classes))

    def forward(self, x):
        return self.head(self.body(x))


def _warm_bn(model, x):
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


# ------------------------------------------------------------------------- Fisher


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_exact_fisher_matches_closed_form_logistic_regression(method):
    x, y = _logreg_data()
    model = nn.Linear(3, 2)
    fisher = ewc.estimate_fisher(
        model, DataLoader(TensorDataset(x, y), batch_size=7), n_samples=len(x), labels="exact", method=method
    )
    expect = _closed_form_fisher(model, x)
    for name in ("weight", "bias"):
        torch.testing.assert_close(fisher[name].double(), expect[name], rtol=1e-5, atol=1e-7)


def test_sampled_fisher_converges_to_closed_form():
    # The default estimator samples labels from the model's softmax: with many draws per
    # input it must approach the exact expectation (relative error ~ 1/sqrt(draws * N)).
    x, y = _logreg_data(n=16)
    model = nn.Linear(3, 2)
    fisher = ewc.estimate_fisher(model, [(x, y)], n_samples=len(x), draws=4000, chunk_size=8192, method="vmap")
    expect = _closed_form_fisher(model, x)
    for name in ("weight", "bias"):
        torch.testing.assert_close(fisher[name].double(), expect[name], rtol=0.05, atol=1e-4)


def test_sampled_fisher_uses_model_predictions_not_true_labels():
    # Labels that the model gets confidently wrong give a huge empirical Fisher; the
    # true (sampled) Fisher of a confident model is small whatever the data labels say.
    x, _ = _logreg_data(n=32)
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.mul_(4)
        wrong = 1 - model(x).argmax(1)
    f_sampled = ewc.estimate_fisher(model, [(x, wrong)], n_samples=32, draws=64)
    f_emp = ewc.estimate_fisher(model, [(x, wrong)], n_samples=32, labels="empirical")
    assert f_emp["weight"].sum() > 3 * f_sampled["weight"].sum()


def test_fisher_vmap_and_loop_agree_on_conv_bn_net_and_respect_n_samples():
    model = TinyNet()
    x = torch.randn(10, 3, 8, 8)
    _warm_bn(model, x)
    loader = DataLoader(TensorDataset(x, torch.zeros(10, dtype=torch.long)), batch_size=4)
    a = ewc.estimate_fisher(model, loader, n_samples=6, method="vmap", seed=3)
    b = ewc.estimate_fisher(model, loader, n_samples=6, method="loop", seed=3)
    assert set(a) == {n for n, _ in model.named_parameters()}
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-8)
    # only the first 6 inputs count: the same estimate from a loader of just those
    c = ewc.estimate_fisher(model, [(x[:4], None), (x[4:6], None)], n_samples=6, method="loop", seed=3)
    for n in a:
        torch.testing.assert_close(a[n], c[n], rtol=1e-4, atol=1e-8)
    assert not model.training


def test_fisher_covers_frozen_parameters_and_restores_flags():
    model = TinyNet()
    model.body[0].weight.requires_grad_(False)
    f = ewc.estimate_fisher(model, [torch.randn(4, 3, 8, 8)], n_samples=4, method="loop")
    assert f["body.0.weight"].abs().sum() > 0
    assert model.body[0].weight.requires_grad is False


# ------------------------------------------------------------------------- penalty


def _state_for(model, fisher=None, backbone="tiny"):
    if fisher is None:
        fisher = {n: torch.rand_like(p) + 0.1 for n, p in model.named_parameters()}
    return ewc_state.EWCState.from_model(
        model, fisher, backbone=backbone, classes=["a", "b"], task=ewc_state.TaskRecord("A", 8)
    )


def test_penalty_zero_at_anchor_and_gradient_points_back():
    model = TinyNet()
    state = _state_for(model)
    pen = ewc.EWCPenalty(state, model, lam=3.0)
    value = pen(model)
    assert float(value.detach()) == 0.0
    value.backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in model.parameters())

    deltas = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            deltas[n] = torch.randn_like(p) * 0.1
            p.add_(deltas[n])
    model.zero_grad()
    value = pen(model)
    expect = 3.0 * sum((state.fisher[n] * d.pow(2)).sum() for n, d in deltas.items())
    torch.testing.assert_close(value, expect)
    value.backward()
    for n, p in model.named_parameters():
        # d/dtheta lam F (theta - theta*)^2 = 2 lam F (theta - theta*): descent moves back
        torch.testing.assert_close(p.grad, 2 * 3.0 * state.fisher[n] * deltas[n])
        assert float((-p.grad * deltas[n]).sum()) < 0
    dist_before = sum(float(d.pow(2).sum()) for d in deltas.values())
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.01 * p.grad)
    dist_after = sum(float((p.detach() - state.anchors[n]).pow(2).sum()) for n, p in model.named_parameters())
    assert dist_after < dist_before


def test_penalty_rejects_bad_lambda_and_unknown_parameters():
    model = TinyNet()
    state = _state_for(model)
    with pytest.raises(ValueError, match="lambda"):
        ewc.EWCPenalty(state, model, lam=-1)
    other = nn.Linear(2, 2)
    with pytest.raises(ewc_state.EWCError, match="no parameter"):
        ewc.EWCPenalty(state, other, lam=1)


# ------------------------------------------------------------------------- head growth


def test_grow_head_keeps_old_logits_bit_exact_and_frees_new_rows():
    model = TinyNet(num_classes=2)
    x = torch.randn(6, 3, 8, 8)
    _warm_bn(model, x)
    with torch.no_grad():
        before = model(x)
    state = _state_for(model)
    head = _grow(model, 4)
    assert head == "head.1"
    model.eval()
    with torch.no_grad():
        after = model(x)
    assert after.shape == (6, 4)
    assert torch.equal(after[:, :2], before)
    assert torch.isfinite(after[:, 2:]).all()
    assert not torch.equal(model.head[1].weight[2], model.head[1].weight[3])

    # penalty: old rows anchored, new rows free
    pen = ewc.EWCPenalty(state, model, lam=1.0)
    assert float(pen(model).detach()) == 0.0
    with torch.no_grad():
        model.head[1].weight.add_(1.0)
    model.zero_grad()
    pen(model).backward()
    g = model.head[1].weight.grad
    assert float(g[:2].abs().min()) > 0 and float(g[2:].abs().max()) == 0.0


def test_grow_head_on_registry_classifier_updates_num_classes():
    backbones = pytest.importorskip("training.backbones")
    model = backbones.build_model("tiny_cnn", 2, weights="none").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    model.grow_head(3)
    with torch.no_grad():
        after = model(x)
    assert model.num_classes == 3 and torch.equal(after[:, :2], before)
    # the saved state_dict loads into the plain registry model (nn.Linear head)
    plain = backbones.build_model("tiny_cnn", 3, weights="none").eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), after, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="shrink"):
        model.grow_head(2)


def test_head_row_freeze_survives_weight_decay_and_momentum():
    model = TinyNet(2)
    _grow(model, 3)
    old_w = model.head[1].weight[:2].detach().clone()
    old_b = model.head[1].bias[:2].detach().clone()
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    _fit(model, [(x, y)] * 3, epochs=2, optimizer=opt, after_step=HeadRowFreeze(model, "head.1", 2))
    assert torch.equal(model.head[1].weight[:2], old_w) and torch.equal(model.head[1].bias[:2], old_b)
    assert not torch.equal(model.head[1].weight[2:], torch.zeros(1))


# ------------------------------------------------------------------------- anchors file


def test_fisher_file_round_trip_and_check(tmp_path):
    model = TinyNet()
    fisher = ewc.estimate_fisher(model, [torch.randn(4, 3, 8, 8)], n_samples=4)
    state = ewc_state.EWCState.from_model(
        model,
        fisher,
        backbone="tiny",
        classes=["ok", "defect"],
        task=ewc_state.TaskRecord("line-A", 4, classes=("ok", "defect")),
    )
    path = state.save(tmp_path)
    assert path.name == ewc_state.FISHER_FILE and not list(tmp_path.glob(".*tmp"))
    back = ewc_state.EWCState.load(tmp_path)
    assert back.backbone == "tiny" and back.classes == ("ok", "defect")
    assert back.tasks == state.tasks and back.anchor_sha256 == state.anchor_sha256
    for n in state.fisher:
        assert torch.equal(back.fisher[n], state.fisher[n]) and torch.equal(back.anchors[n], state.anchors[n])
    back.check_model(model, backbone="tiny")  # same weights: accepted


def test_mismatched_fisher_file_is_refused(tmp_path):
    model = TinyNet()
    state = _state_for(model)
    state.save(tmp_path / "f.safetensors")
    loaded = ewc_state.EWCState.load(tmp_path / "f.safetensors")

    with pytest.raises(ewc_state.EWCError, match="backbone 'tiny'.*'resnet18'"):
        loaded.check_model(model, backbone="resnet18")

    changed = TinyNet()
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.head[1].bias[0] += 1e-3
    with pytest.raises(ewc_state.EWCError, match="different weights"):
        loaded.check_model(changed, backbone="tiny")

    with pytest.raises(
        ewc_state.EWCError, match=r"'head.1.(weight|bias)' is \(2,.*\) in the file, \(3,.*\) in the model"
    ):
        loaded.check_model(TinyNet(num_classes=3))

    with pytest.raises(ewc_state.EWCError, match="only in the model"):
        loaded.check_model(nn.Sequential(TinyNet(), nn.Linear(2, 2)))


def test_tampered_or_foreign_file_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = TinyNet()
    path = _state_for(model).save(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["anchor.head.1.bias"] = tensors["anchor.head.1.bias"] + 1
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=meta)
    with pytest.raises(ewc_state.EWCError, match="corrupt or was edited"):
        ewc_state.EWCState.load(tmp_path / "edited.safetensors")

    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"), metadata={"format": "other"})
    with pytest.raises(ewc_state.EWCError, match="'format' is 'other'"):
        ewc_state.EWCState.load(tmp_path / "foreign.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ewc_state.EWCError, match="not a readable"):
        ewc_state.EWCState.load(tmp_path / "junk.safetensors")
    with pytest.raises(ewc_state.EWCError, match="--finalize"):
        ewc_state.EWCState.load(tmp_path / "missing")


# ------------------------------------------------------------------------- online EWC


def test_online_consolidation_decays_old_fisher_and_moves_anchor():
    model = TinyNet(2)
    f_a = {n: torch.full_like(p, 2.0) for n, p in model.named_parameters()}
    state = ewc_state.EWCState.from_model(
        model, f_a, backbone="tiny", classes=["a", "b"], task=ewc_state.TaskRecord("A", 8), gamma=0.5
    )
    _grow(model, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.25)
    f_b = {n: torch.full_like(p, 1.0) for n, p in model.named_parameters()}
    new = ewc.consolidate(
        state, model, f_b, task=ewc_state.TaskRecord("B", 8), backbone="tiny", classes=["a", "b", "c"]
    )
    assert [t.name for t in new.tasks] == ["A", "B"] and new.gamma == 0.5
    assert torch.allclose(new.fisher["body.0.weight"], torch.full_like(f_b["body.0.weight"], 0.5 * 2 + 1))
    # grown head: old rows 0.5*2+1, the new row only its own Fisher
    w = new.fisher["head.1.weight"]
    assert torch.allclose(w[:2], torch.full_like(w[:2], 2.0)) and torch.allclose(w[2:], torch.ones_like(w[2:]))
    for n, p in model.named_parameters():
        assert torch.equal(new.anchors[n], p.detach())
    new.check_model(model, backbone="tiny")
    with pytest.raises(ValueError, match="gamma"):
        ewc.consolidate(state, model, f_b, task=ewc_state.TaskRecord("B", 8), backbone="tiny", classes=[], gamma=1.5)


# ------------------------------------------------------------------------- replay, BN


def test_replay_count_parsing():
    assert replay_count("5%", 1000) == 50
    assert replay_count(0.05, 1000) == 50
    assert replay_count("200", 1000) == 200
    assert replay_count(5000, 1000) == 1000
    assert replay_count("0", 1000) == 0
    with pytest.raises(ValueError, match="count like 200"):
        replay_count("lots", 10)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        replay_count(1.5, 10)


def test_select_exemplars_is_class_balanced_and_deterministic():
    labels = [0] * 90 + [1] * 8 + [2] * 30
    idx = select_exemplars(labels, 30, seed=1)
    counts = {c: sum(labels[i] == c for i in idx) for c in range(3)}
    assert len(idx) == len(set(idx)) == 30
    assert counts[1] == 8 and abs(counts[0] - counts[2]) <= 1  # the small class gives all it has
    assert idx == select_exemplars(labels, 30, seed=1)
    assert idx != select_exemplars(labels, 30, seed=2)
    assert len(select_exemplars(labels, 1000)) == len(labels)


def test_mix_replay_share():
    new = TensorDataset(torch.zeros(90, 1), torch.zeros(90, dtype=torch.long))
    buf = TensorDataset(torch.ones(10, 1), torch.ones(10, dtype=torch.long))
    mixed = mix_replay(new, buf, share=0.25)
    frac = sum(int(mixed[i][1]) for i in range(len(mixed))) / len(mixed)
    assert 0.2 <= frac <= 0.3
    assert len(mix_replay(new, buf)) == 100


@pytest.mark.parametrize("bn", ["frozen", "update"])
def test_bn_statistics_frozen_or_updated(bn):
    model = TinyNet()
    bn_layer = model.body[1]
    mean0 = bn_layer.running_mean.clone()
    x, y = torch.randn(8, 3, 8, 8) + 3.0, torch.randint(0, 2, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _fit(model, [(x, y)], epochs=1, optimizer=opt, bn=bn)
    assert torch.equal(bn_layer.running_mean, mean0) == (bn == "frozen")
    assert not torch.equal(bn_layer.weight, torch.ones_like(bn_layer.weight))  # affine still learns


# ------------------------------------------------------------------------- two tasks


def _task_a(n, g):
    # label = sign(x0); x1 is near-constant noise in task A
    x0 = torch.randn(n, generator=g)
    x1 = 0.1 * torch.randn(n, generator=g)
    return torch.stack([x0, x1], 1), (x0 > 0).long()


def _task_b(n, g):
    # label = sign(x1), and x0 is *anti*-correlated with it: naive fine-tuning learns
    # to use -x0, which breaks task A; a joint solution (small +x0, large +x1) exists.
    y = (torch.rand(n, generator=g) > 0.5).long()
    s = 2 * y - 1
    x1 = s * (0.3 + torch.rand(n, generator=g))
    x0 = -s * 0.7 * torch.rand(n, generator=g)
    return torch.stack([x0, x1], 1), y


def _acc(model, x, y):
    preds = Engine().predict(model, [(x, y)])
    return accuracy(preds.logits, preds.labels)


def test_two_task_run_naive_forgets_and_ewc_forgets_less(tmp_path):
    g = torch.Generator().manual_seed(0)
    xa, ya = _task_a(600, g)
    xb, yb = _task_b(600, g)
    xa_t, ya_t = _task_a(1000, g)
    xb_t, yb_t = _task_b(1000, g)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
    loader_a = DataLoader(TensorDataset(xa, ya), batch_size=32, shuffle=True)
    _fit(model, loader_a, epochs=10, optimizer=torch.optim.Adam(model.parameters(), 1e-2))
    acc_a0 = _acc(model, xa_t, ya_t)
    assert acc_a0 > 0.95

    fisher = ewc.estimate_fisher(model, DataLoader(TensorDataset(xa, ya), batch_size=64), n_samples=600)
    state = ewc_state.EWCState.from_model(
        model, fisher, backbone="mlp", classes=["0", "1"], task=ewc_state.TaskRecord("A", 600)
    )
    state.save(tmp_path)  # extend from the file, not from the live Fisher
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def extend(lam):
        model.load_state_dict(start)
        torch.manual_seed(2)
        loader_b = DataLoader(TensorDataset(xb, yb), batch_size=32, shuffle=True)
        pen = None
        if lam:
            loaded = ewc_state.EWCState.load(tmp_path)
            loaded.check_model(model, backbone="mlp")
            pen = ewc.EWCPenalty(loaded, model, lam)
        hist = _fit(model, loader_b, epochs=10, optimizer=torch.optim.Adam(model.parameters(), 1e-2), penalty=pen)
        return acc_a0 - _acc(model, xa_t, ya_t), _acc(model, xb_t, yb_t), hist

    forget_naive, new_naive, h_naive = extend(0.0)
    forget_ewc, new_ewc, h_ewc = extend(10.0)
    assert forget_naive > 0.15, forget_naive
    assert forget_ewc < 0.6 * forget_naive, (forget_ewc, forget_naive)
    assert new_naive > 0.95 and new_ewc > 0.95
    assert h_naive.penalty_share == 0.0 and 0.0 < h_ewc.penalty_share < 1.0
    assert len(h_ewc.penalty) == len(h_ewc.task_loss) == 10 * 19


def test_plot_report_writes_png(tmp_path):
    hist = FitHistory(task_loss=[1.0, 0.5, 0.3], penalty=[0.0, 0.1, 0.2])
    report = {
        "method": "ewc",
        "old_accuracy_before": 0.9,
        "old_accuracy_after": 0.85,
        "new_accuracy_before": 0.5,
        "new_accuracy_after": 0.95,
        "forgetting": 0.05,
    }
    path = plot_forgetting(report, hist, tmp_path / "ewc.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(hist.to_dict())
