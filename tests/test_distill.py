"""Distillation (``ddpmkit distill``): each method's loss against a hand computation, students of the
closed-form ideal teacher of Gaussian data, resume equality, the student run, and bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from conftest import small_run
from safetensors.torch import load_file

import ddpmkit
from ddpmkit.cli import cli
from ddpmkit.run.distill import Distillation, drift_function
from ddpmkit.sdk.distill import euler, heun
from ddpmkit.sdk.ode import VPODE
from ddpmkit_plugins.distillers.progressive import Progressive, ProgressiveConfig
from ddpmkit_plugins.distillers.reflow import Reflow, ReflowConfig
from ddpmkit_plugins.processes.flow import FlowConfig, FlowProcess

MU, S = 0.3, 0.5  # the Gaussian data of the ideal teacher: every pixel N(MU, S²)


def vp_ode(timesteps=1000):
    return VPODE(ddpmkit.GaussianDiffusion(ddpmkit.build("schedule", "linear", {"timesteps": timesteps})))


def bc(v, x):
    return v.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


# -- the closed-form ideal teachers of N(MU, S²) data ------------------------------
def ideal_vp(x, sigma, labels=None):
    """x̃ = x_0 + σ·ε: E[x_0 | x̃] = μ + s²/(s² + σ²)·(x̃ − μ); dx̃/dσ = (x̃ − E[x_0 | x̃])/σ."""
    s2 = bc(sigma, x) ** 2
    return (x - (MU + S ** 2 / (S ** 2 + s2) * (x - MU))) / bc(sigma, x)


def ideal_flow(x, t, labels=None):
    """x_t = (1 − t)·x_0 + t·ε: v = E[ε − x_0 | x_t]."""
    tt = bc(t, x)
    a = 1 - tt
    var = a ** 2 * S ** 2 + tt ** 2
    m = x - a * MU
    return tt * m / var - MU - a * S ** 2 * m / var


class Affine(torch.nn.Module):
    """A student that can be exact for Gaussian data: dx/dt = A(t)·x + B(t), A and B from a small MLP of log t."""

    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2))

    def forward(self, x, t, labels=None):
        ab = self.mlp(t.clamp(min=1e-4).log().float().view(-1, 1))
        return bc(ab[:, 0], x) * x + bc(ab[:, 1], x)


class AffineDenoiser(Affine):
    """The vp student as a real vp network is built: it sees x_t = x̃/√(1 + σ²), its output is x̂_0 (affine
    in x_t), and its drift is (x̃ − x̂_0)/σ, so the first step from σ_max ≈ 157 is not a 1e-4-accurate slope."""

    def forward(self, x, t, labels=None):
        x0 = super().forward(x / (1 + bc(t, x) ** 2).sqrt(), t)
        return (x - x0) / bc(t, x)


def fit(distiller, student, teacher, first=None, batch=256, lr=1e-2, seed=0):
    """The distillation loop of ddpmkit.run.distill, reduced to the loss: data from N(MU, S²); ``first``:
    the first stage's steps (the one that fits the ideal teacher over all its times), if not the stage's own.
    Returns the student's weights after each stage, by its calls."""
    gen = torch.Generator().manual_seed(seed)
    end, snapshots = 0, {}
    for k, stage in enumerate(distiller.stages):
        end += stage.steps
        if getattr(distiller, "chain", False) and k > 0:
            frozen = type(student)()
            frozen.load_state_dict(student.state_dict())
            teacher = frozen.requires_grad_(False)
        opt = torch.optim.Adam(student.parameters(), lr=lr)
        steps = first if first and k == 0 else stage.steps
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        for _ in range(steps):
            x0 = MU + S * torch.randn(batch, 1, 2, 2, generator=gen)
            loss = distiller.loss(student, teacher, x0, None, k, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        snapshots[stage.calls] = {k: v.clone() for k, v in student.state_dict().items()}
    return snapshots


# -- each loss against a hand computation ------------------------------------------
@pytest.mark.parametrize("process,solver,stage,metric", [
    ("flow", "euler", 0, "mse"), ("vp", "euler", 0, "mse"), ("flow", "heun", 0, "mse"), ("vp", "heun", 0, "mse"),
    ("flow", "heun", 1, "mse"), ("vp", "heun", 0, "pseudo-huber")])
def test_progressive_loss_is_the_hand_computation(process, solver, stage, metric):
    ode = FlowProcess(FlowConfig()) if process == "flow" else vp_ode(100)
    torch.manual_seed(0)
    net_t, net_s = torch.nn.Conv2d(1, 1, 1), torch.nn.Conv2d(1, 1, 1)  # tiny networks
    teacher = drift_function(lambda x, t: net_t(x) * (1 + t.float().view(-1, 1, 1, 1) / 1000), ode, 1, None)
    student = drift_function(lambda x, t: net_s(x) * (1 + t.float().view(-1, 1, 1, 1) / 1000), ode, 1, None)
    d = Progressive(ProgressiveConfig(start=4, calls=1, steps=1, solver=solver, metric=metric), ode)
    assert [s.calls for s in d.stages] == [2, 1]
    x0 = torch.rand(5, 1, 3, 3) * 2 - 1
    loss = d.loss(student, teacher, x0, None, stage=stage, generator=torch.Generator().manual_seed(3))
    # by hand: the same draws, two teacher steps on grid(2n), one student step on grid(n); the teacher's
    # steps Heun's only in the first stage with solver = heun, and Euler's where they end at t = 0
    n = d.stages[stage].calls
    heun = solver == "heun" and stage == 0
    gen = torch.Generator().manual_seed(3)
    i = torch.randint(0, n, (5,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    fine = ode.grid(2 * n)
    want = []
    for b in range(5):
        t0, tm, t1 = fine[2 * i[b]], fine[2 * i[b] + 1], fine[2 * i[b] + 2]
        x = (1 - t0) * x0[b] + t0 * eps[b] if process == "flow" else x0[b] + t0 * eps[b]
        x = x.unsqueeze(0).float()

        def f(net, xx, t):
            tb = t.view(1).double()
            inp = ode.net_input(xx, tb)
            out = net(inp) * (1 + ode.net_time(tb).float().view(-1, 1, 1, 1) / 1000)
            return ode.drift(out, xx, tb)

        def step(xx, ta, tb):
            d1 = f(net_t, xx, ta)
            xe = xx + float(tb - ta) * d1
            return xx + float(tb - ta) * (d1 + f(net_t, xe, tb)) / 2 if heun and float(tb) > 0 else xe

        x2 = step(step(x, t0, tm), tm, t1)
        xs = x + float(t1 - t0) * f(net_s, x, t0)
        weight = max(1.0, float(t0) ** 2)
        e = (xs - x2) / float(t1 - t0)
        c = 0.00054 * 3  # pseudo-Huber's c for 9 numbers per image
        want.append(weight * ((e**2).mean() if metric == "mse" else ((e**2).sum() + c**2).sqrt() - c))
    assert torch.allclose(loss, torch.stack(want).mean(), rtol=1e-5)
    loss.backward()  # the student learns; the teacher does not
    assert net_s.weight.grad is not None and net_t.weight.grad is None


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_progressive_on_teacher_trajectories_is_the_hand_computation(tmp_path, solver):
    """inputs = "teacher": the trajectories are the first teacher's two steps per student step from
    prior noise, and the loss is the student's one step against the next stored state."""
    ode = FlowProcess(FlowConfig())
    torch.manual_seed(0)
    net_t, net_s = torch.nn.Conv2d(1, 1, 1), torch.nn.Conv2d(1, 1, 1)
    teacher = drift_function(lambda x, t: net_t(x) * (1 + t.float().view(-1, 1, 1, 1) / 1000), ode, 1, None)
    student = drift_function(lambda x, t: net_s(x) * (1 + t.float().view(-1, 1, 1, 1) / 1000), ode, 1, None)
    d = Progressive(ProgressiveConfig(start=4, calls=2, solver=solver, inputs="teacher", pairs=5), ode)
    assert d.uses_data is False
    d.prepare(teacher, shape=(1, 3, 3), num_classes=None, generator=torch.Generator().manual_seed(4),
              directory=tmp_path, batch_size=2)
    assert d.bank.shape == (5, 3, 1, 3, 3)
    # by hand: the prior's noise, then the teacher's steps on grid(4), a state kept after every second
    gen = torch.Generator().manual_seed(4)
    z = torch.cat([ode.prior((b, 1, 3, 3), generator=gen) for b in (2, 2, 1)])  # drawn batch by batch
    fine = ode.grid(4)
    step = (lambda f, x, a, b: heun(f, x, torch.stack([a, b]), None)) if solver == "heun" else \
        (lambda f, x, a, b: euler(f, x, torch.stack([a, b]), None))
    with torch.no_grad():
        x1 = step(teacher, step(teacher, z[:2], fine[0], fine[1]), fine[1], fine[2])
        x2 = step(teacher, step(teacher, x1, fine[2], fine[3]), fine[3], fine[4])
    assert torch.allclose(d.bank[:2, 0], z[:2]) and torch.allclose(d.bank[:2, 1], x1, atol=1e-6)
    assert torch.allclose(d.bank[:2, 2], x2, atol=1e-6)
    loss = d.loss(student, None, torch.zeros(4, 1, 3, 3), None, 0, torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)
    k, i = torch.randint(0, 5, (4,), generator=gen), torch.randint(0, 2, (4,), generator=gen)
    t, t_next = fine[2 * i], fine[2 * i + 2]
    x, target = d.bank[k, i], d.bank[k, i + 1]
    h = bc(t_next - t, x).float()
    want = ((x + h * student(x, t, None) - target) / h).pow(2).flatten(1).mean(1).mean()
    assert torch.allclose(loss, want, rtol=1e-6)
    # drawn once: a second distiller reads them back from the directory instead of calling the teacher
    again = Progressive(ProgressiveConfig(start=4, calls=2, solver=solver, inputs="teacher", pairs=5), ode)
    again.prepare(None, shape=(1, 3, 3), num_classes=None, generator=None, directory=tmp_path)
    assert torch.equal(again.bank, d.bank)


def test_teacher_trajectories_are_one_stage():
    with pytest.raises(ddpmkit.DdpmkitError, match="distils in one stage: set distiller.start=4"):
        Progressive(ProgressiveConfig(start=8, calls=2, inputs="teacher"), FlowProcess(FlowConfig()))


@pytest.mark.parametrize("metric", ["mse", "pseudo-huber"])
def test_reflow_loss_is_the_hand_computation(metric):
    ode = FlowProcess(FlowConfig())
    d = Reflow(ReflowConfig(pairs=6, one_call=0.5, metric=metric), ode)
    d.z, d.x, d.labels = torch.randn(6, 1, 2, 2), torch.rand(6, 1, 2, 2), torch.arange(6) % 3
    torch.manual_seed(1)
    net = torch.nn.Conv2d(1, 1, 1)
    seen = []

    def student(x, t, labels):
        seen.append(labels)
        return net(x) * t.float().view(-1, 1, 1, 1)

    loss = d.loss(student, None, torch.zeros(4, 1, 2, 2), None, 0, torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 6, (4,), generator=gen)
    t = torch.rand(4, generator=gen, dtype=torch.float64)
    t[:2] = 1.0  # one_call = 0.5 of the batch at t = 1
    z, x = d.z[idx], d.x[idx]
    xt = (1 - bc(t, x)) * x + bc(t, x) * z
    err = net(xt) * bc(t, x) - (z - x)
    if metric == "mse":
        want = (err**2).mean()
    else:  # per image: sqrt(|err|² + c²) − c, c = 0.00054·sqrt(4 numbers per image)
        c = 0.00054 * 2
        want = torch.stack([((e**2).sum() + c**2).sqrt() - c for e in err]).mean()
    assert torch.allclose(loss, want, rtol=1e-6)
    assert torch.equal(seen[0], d.labels[idx])  # the couplings' own labels


# -- students of the ideal teacher of Gaussian data -----------------------------------------
def moments(x):
    return float(x.mean()), float(x.std())


def test_reflow_student_of_the_ideal_flow_draws_the_gaussian_in_one_call(tmp_path):
    ode = FlowProcess(FlowConfig())
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 1, 2, 2, generator=gen)
    # the teacher at one call draws the mean for every z (the expected velocity at t = 1 is z − μ)
    m, s = moments(euler(ideal_flow, z, ode.grid(1), None))
    assert abs(m - MU) < 0.02 and s < 0.05
    m, s = moments(heun(ideal_flow, z, ode.grid(16), None))  # its ODE: N(μ, s²)
    assert abs(m - MU) < 0.02 and abs(s - S) < 0.02
    d = Reflow(ReflowConfig(pairs=2048, teacher_steps=16, steps=300), ode)
    d.prepare(ideal_flow, shape=(1, 2, 2), num_classes=None, generator=torch.Generator().manual_seed(1),
              directory=tmp_path)
    student = Affine()
    fit(d, student, None)
    with torch.no_grad():
        for calls in (1, 2):
            m, s = moments(euler(student, z, ode.grid(calls), None))
            assert abs(m - MU) < 0.03 and abs(s - S) < 0.03, (calls, m, s)


def test_progressive_student_of_the_ideal_vp_teacher_draws_the_gaussian_in_one_call():
    ode = vp_ode()
    gen = torch.Generator().manual_seed(0)
    x_prior = ode.prior((20000, 1, 2, 2), generator=gen)
    m, s = moments(euler(ideal_vp, x_prior, ode.grid(128), None))  # the first teacher: 128 Euler (DDIM) steps
    assert abs(m - MU) < 0.015 and abs(s - S) < 0.015
    m, s = moments(euler(ideal_vp, x_prior, ode.grid(1), None))  # one DDIM step of the ideal teacher: the mean
    assert s < 0.05
    d = Progressive(ProgressiveConfig(start=128, calls=1, steps=200), ode)
    assert [st.calls for st in d.stages] == [64, 32, 16, 8, 4, 2, 1]
    student = AffineDenoiser()
    stages = fit(d, student, ideal_vp, first=800, batch=128)
    with torch.no_grad():
        for calls in (1, 2):  # the stage that ends in that many calls
            student.load_state_dict(stages[calls])
            m, s = moments(euler(student, x_prior, ode.grid(calls), None))
            assert abs(m - MU) < 0.03 and abs(s - S) < 0.03, (calls, m, s)


# -- the student run: files, sampling, resume, bad input ----------------------------------
@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    runner = CliRunner()
    for name, args in (("vp", small_run({"preset": "tiny-cond"})),  # class-conditional
                       ("flow", [*small_run({"schedule.timesteps": None}), "--process", "flow", "--sampler", "euler",
                                  "--steps", "3"])):
        r = runner.invoke(cli, ["run", *args, "--out", str(root / name)])
        assert r.exit_code == 0, r.output
    return root


def job(teacher, out, method="progressive", lr_decay=0.0, **options):
    opts = {"progressive": {"start": 4, "calls": 1, "steps": 3},
            "reflow": {"pairs": 12, "teacher_steps": 2, "steps": 5}}[method]
    return Distillation(str(teacher), out, method, {**opts, **options}, batch_size=4, checkpoint_every=2,
                        lr_decay=lr_decay, num_samples=2, device="cpu", progress=False)


def test_lr_decay_falls_to_zero_over_each_stage_end(teachers, tmp_path):
    d = job(teachers / "vp", tmp_path / "s", steps=4, lr_decay=0.5)  # 2 stages of 4 steps
    assert [d._lr(step, step // 4) for step in range(8)] == pytest.approx([3e-4, 3e-4, 3e-4, 1.5e-4] * 2)
    assert {job(teachers / "vp", tmp_path / "c", steps=4)._lr(s, s // 4) for s in range(8)} == {3e-4}


def test_resume_is_the_uninterrupted_distillation(teachers, tmp_path):
    teacher = teachers / "vp"
    job(teacher, tmp_path / "full", lr_decay=0.7).run()  # 2 stages of 3 steps: 4 → 2 → 1 calls
    for stop in (3, 4):  # a stage's end (Adam starts afresh), a stage's middle (Adam's state resumes)
        cut = tmp_path / f"cut{stop}"
        assert job(teacher, cut, lr_decay=0.7).run(stop_after=stop).name == "checkpoints"
        assert not (cut / "model.safetensors").exists()
        job(teacher, cut, lr_decay=0.7).run(resume=True)
        for rel in ["model.safetensors", "stages/calls-2.safetensors", "stages/calls-1.safetensors"]:
            a, b = load_file(str(tmp_path / "full" / rel)), load_file(str(cut / rel))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (stop, rel)
        logged = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
        assert logged == sorted(set(logged))


def test_sigkill_then_resume_is_the_uninterrupted_distillation(teachers, tmp_path):
    args = ["distill", str(teachers / "flow"), "--method", "reflow", "--set", "distiller.pairs=12", "--set",
            "distiller.teacher_steps=2", "--steps", "60", "--lr-decay", "0.5", "--batch-size", "4", "--checkpoint-every", "5",
            "--num-samples", "2", "--no-progress", "--device", "cpu"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    # the uninterrupted reference in this process (the same threads as the subprocesses: conftest)
    job(teachers / "flow", ref, "reflow", lr_decay=0.5, pairs=12, teacher_steps=2, steps=60).run()
    proc = subprocess.Popen([sys.executable, "-m", "ddpmkit", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoints" / "step-00000010.safetensors").exists():
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists(), "the distillation finished before it could be killed"
    # the resume in this process: what it reads is only what the killed process left on disk
    r = CliRunner().invoke(cli, ["distill", "--resume", str(killed), "--no-progress", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_file(str(ref / "couplings.safetensors"))["x"].equal(load_file(str(killed / "couplings.safetensors"))["x"])
    logged = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(10, 61, 10))


def test_resume_on_teacher_trajectories_is_the_uninterrupted_distillation(teachers, tmp_path):
    opts = {"start": 4, "calls": 2, "steps": 6, "inputs": "teacher", "pairs": 6, "solver": "heun"}
    job(teachers / "vp", tmp_path / "full", **opts).run()  # class-conditional: the labels cycle with the pairs
    cut = tmp_path / "cut"
    assert job(teachers / "vp", cut, **opts).run(stop_after=3).name == "checkpoints"
    job(teachers / "vp", cut, **opts).run(resume=True)
    for rel in ["model.safetensors", "trajectories.safetensors"]:
        a, b = load_file(str(tmp_path / "full" / rel)), load_file(str(cut / rel))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    assert load_file(str(cut / "trajectories.safetensors"))["labels"].tolist() == [0, 1, 2, 3, 4, 5]


def test_student_run_samples_in_its_calls(teachers, tmp_path):
    out = tmp_path / "student"
    r = CliRunner().invoke(cli, ["distill", str(teachers / "vp"), "--method", "progressive", "--out", str(out),
                                 "--set", "distiller.start=4", "--calls", "2", "--steps", "2", "--batch-size", "4",
                                 "--num-samples", "4", "--no-progress", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["calls-2.png", "calls-2.safetensors"]
    report = json.loads((out / "distill.json").read_text())
    assert [s["calls"] for s in report["stages"]] == [2] and report["method"] == "progressive"
    pipe = ddpmkit.load_checkpoint(out, device="cpu")
    name, sampler = pipe.sampler()
    assert name == "euler" and sampler.num_steps == 2
    assert pipe.num_classes == 10  # a class-conditional teacher gives a class-conditional student
    calls = []
    pipe.sample(3, progress=lambda k, total: calls.append(total))
    assert calls[-1] == 2
    r = CliRunner().invoke(cli, ["sample", str(out), "-n", "4", "--out", str(tmp_path / "s.png"), "--no-progress"])
    assert r.exit_code == 0 and (tmp_path / "s.png").exists(), r.output
    # the student differs from its teacher: it was trained
    teacher = load_file(str(teachers / "vp" / "model.safetensors"))
    student = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)


@pytest.mark.parametrize("args,message", [
    (["TEACHER_UNFINISHED", "--out", "OUT"], "is not a finished run"),
    (["vp", "--method", "progressive", "--calls", "3", "--out", "OUT"], "cannot reach 3"),
    (["vp", "--method", "reflow", "--out", "OUT"], "reflow straightens"),
    (["vp", "--method", "consistency-x", "--out", "OUT"], "consistency-x"),
    (["vp", "--out", "OUT", "--set", "sampler.steps=3"], "only takes --set distiller"),
    (["vp", "--out", "OUT", "--lr-decay", "1.5"], "--lr-decay is the share"),
    (["vp", "--out", "OUT", "--set", "distiller.solver=rk4"],
     "invalid option for distiller 'progressive': 'solver' must be in ('euler', 'heun') (got 'rk4')"),
    (["--resume", "OUT"], "nothing to resume"),
    (["vp"], "--out STUDENT"),
])
def test_bad_input_is_one_line_exit_2(teachers, tmp_path, args, message):
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    args = [str(unfinished) if a == "TEACHER_UNFINISHED" else str(tmp_path / "out") if a == "OUT"
            else str(teachers / a) if a in ("vp", "flow") else a for a in args]
    r = CliRunner().invoke(cli, ["distill", *args, "--no-progress", "--device", "cpu"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], r.output


def test_math_of_the_ideal_teachers():
    """The closed forms above are right: the exact ODE maps N(0, 1) noise to N(μ, s²)."""
    t = torch.tensor([0.7], dtype=torch.float64)
    x = torch.tensor([[[[0.4]]]], dtype=torch.float64)
    # flow: v = E[ε − x_0 | x_t] by Monte Carlo over the joint
    g = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(4_000_000, generator=g, dtype=torch.float64)
    eps = torch.randn(4_000_000, generator=g, dtype=torch.float64)
    xt = 0.3 * x0 + 0.7 * eps
    near = (xt - 0.4).abs() < 0.005
    assert math.isclose(float((eps - x0)[near].mean()), float(ideal_flow(x, t)), abs_tol=0.02)
