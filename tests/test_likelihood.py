"""Likelihood and learned variance: the variational bound in bits/dim on cases with a known answer,
the hybrid loss (the mean's gradient stopped), loss-aware timestep sampling, the nll metric, and a
learned-variance run exported to diffusers."""

import json
import math
import warnings

import pytest
import torch
from click.testing import CliRunner
from torch.distributions import Normal

import ddpmkit
from ddpmkit.cli import cli
from ddpmkit.diffusion import GaussianDiffusion, ModelOutput, discretized_gaussian_log_likelihood

LN2 = math.log(2.0)


def one_image_case(T=200, c=0.0):
    """Data that is one fixed 8-bit image x*, with its optimal ε-predictor ε*(x_t, t) = (x_t − √ᾱ_t x*)/√(1 − ᾱ_t)
    plus a constant error ``c``."""
    d = GaussianDiffusion(ddpmkit.build("schedule", "linear", {"timesteps": T}))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (1, 1, 4, 4), generator=g).double() / 127.5 - 1
    x[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # both edge bins

    def model(xt, t):
        a = d.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1).to(xt.dtype)
        s = d.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1).to(xt.dtype)
        return (xt - a * x) / s + c

    return d, x, model


def decoder_bits(x, mean, sigma):
    """−log₂ of the Gaussian mass of x's 8-bit bin, by the normal CDF (edge bins open), averaged over pixels."""
    n = Normal(torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64))
    up, lo = n.cdf((x - mean + 1 / 255) / sigma), n.cdf((x - mean - 1 / 255) / sigma)
    mass = torch.where(x < -0.999, up, torch.where(x > 0.999, 1 - lo, up - lo))
    return float(-(mass.log()).mean() / LN2)


def test_the_bound_is_exact_for_one_fixed_image():
    """With the optimal predictor every KL term is 0 (the model's mean and variance are the posterior's), the
    prior term is KL(N(√ᾱ_T x*, 1 − ᾱ_T) ‖ N(0, 1)) and the decoder term is the mass of x*'s bins under
    N(x*, β̃_2): each equal to its closed form, and the bound ≥ the true NLL (0: the data is certain)."""
    d, x, model = one_image_case()
    out = d.nll_bpd(model, x.repeat(3, 1, 1, 1), generator=torch.Generator().manual_seed(1), max_batch=64)
    ab = d.alphas_cumprod[-1]
    prior = float((0.5 * (-1 - torch.log(1 - ab) + (1 - ab) + ab * x ** 2)).mean() / LN2)
    decoder = decoder_bits(x, x, math.sqrt(d.posterior_variance[1]))
    assert out["kl"].abs().max() < 1e-12
    torch.testing.assert_close(out["prior"], torch.full((3,), prior, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(out["decoder"], torch.full((3,), decoder, dtype=torch.float64), rtol=1e-10, atol=0)
    assert torch.equal(out["total"], out["prior"] + out["kl"] + out["decoder"]) and (out["total"] > 0).all()


def test_each_kl_term_of_a_known_error():
    """ε̂ = ε* + c shifts μ_θ by −c·β_t/(√α_t √(1 − ᾱ_t)) (eq. 9) and nothing else, so
    L_{t−1} = (that shift)² / (2 β̃_t) nats per pixel for every t ≥ 2, whatever x_t was drawn."""
    c = 0.05
    d, x, model = one_image_case(T=50, c=c)
    out = d.nll_bpd(model, x, generator=torch.Generator().manual_seed(2), max_batch=7)  # t in uneven blocks
    shift = c * d.eps_coef / d.alphas.sqrt()
    kl = float((shift[1:] ** 2 / (2 * d.posterior_variance[1:])).sum() / LN2)
    decoder = decoder_bits(x, x - shift[0], math.sqrt(d.posterior_variance[1]))
    assert float(out["kl"]) == pytest.approx(kl, rel=1e-10)
    assert float(out["decoder"]) == pytest.approx(decoder, rel=1e-10)
    exact, _, _ = one_image_case(T=50)
    assert float(out["total"]) > float(exact.nll_bpd(one_image_case(T=50)[2], x)["total"])  # an error costs bits


def test_the_bound_is_at_least_the_entropy_of_the_data():
    """Pixels that are independently one of two 8-bit values (p = 0.3, 0.7): the bound of any model, averaged
    over data, is ≥ the data's entropy H = 0.881 bits/dim. With the exact optimal predictor of this data it
    stays within the decoder's slack above it."""
    T = 100
    d = GaussianDiffusion(ddpmkit.build("schedule", "linear", {"timesteps": T}))
    a, b, p = -0.2 - 0.2 / 255, 0.6 + 0.4 / 255, 0.3

    def model(xt, t):  # ε* = (x_t − √ᾱ E[x_0 | x_t]) / √(1 − ᾱ), E[x_0 | x_t] over the two values
        sa = d.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1).to(xt.dtype)
        s2 = (1 - d.alphas_cumprod[t]).reshape(-1, 1, 1, 1).to(xt.dtype)
        la = math.log(p) - (xt - sa * a) ** 2 / (2 * s2)
        lb = math.log(1 - p) - (xt - sa * b) ** 2 / (2 * s2)
        wa = torch.sigmoid(la - lb)
        return (xt - sa * (wa * a + (1 - wa) * b)) / s2.sqrt()

    g = torch.Generator().manual_seed(3)
    x = torch.where(torch.rand(64, 1, 4, 4, generator=g, dtype=torch.float64) < p, a, b)
    out = d.nll_bpd(model, x, generator=g, max_batch=2048)
    entropy = -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    mean, se = float(out["total"].mean()), float(out["total"].std() / 8)
    assert mean - 3 * se > entropy
    assert mean < entropy + float(out["decoder"].mean()) + 0.5


def test_discretized_likelihood_sums_to_one_over_the_256_bins():
    values = (torch.arange(256, dtype=torch.float64) / 127.5 - 1).reshape(256, 1)
    for mean, scale in ((0.1, 0.05), (-0.97, 0.3), (0.5, 2.0)):
        logp = discretized_gaussian_log_likelihood(values, torch.full_like(values, mean),
                                                   torch.full_like(values, math.log(scale)))
        assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-12)


def test_hybrid_loss_stops_the_mean_gradient():
    d = GaussianDiffusion(ddpmkit.build("schedule", "linear", {"timesteps": 100}), variance_type="learned_range")
    loss = ddpmkit.build("loss", "hybrid", {})
    simple = ddpmkit.build("loss", "mse", {})
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 4, 4, generator=g) * 2 - 1
    t = torch.tensor([0, 5, 50, 99])
    eps = torch.randn(x0.shape, generator=g)
    xt = d.q_sample(x0, t, eps)
    pred = (eps + 0.1 * torch.randn(x0.shape, generator=g)).requires_grad_()
    var = (torch.rand(x0.shape, generator=g) * 2 - 1).requires_grad_()
    ctx = ddpmkit.LossContext(x0, xt, t, eps, ModelOutput(pred, var), eps, None, d)
    total = loss(pred, eps, context=ctx)
    vlb = d.vlb_terms(ModelOutput(pred.detach(), var), x0, xt, t).float()
    expected = simple(pred, eps).detach() + 0.001 * 100 * vlb.mean()  # λ·T·L_t
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    total.backward()
    pred_grad = pred.grad.clone()
    p2 = pred.detach().clone().requires_grad_()  # L_simple alone gives the prediction's whole gradient
    simple(p2, eps).backward()
    torch.testing.assert_close(pred_grad, p2.grad)
    assert var.grad is not None and var.grad.abs().sum() > 0  # L_vlb trains the variance
    per = loss(pred, eps, reduction="none", context=ctx)
    assert per.shape == x0.shape and per.mean().item() == pytest.approx(total.item(), rel=1e-5)
    plain = ddpmkit.LossContext(x0, xt, t, eps, ModelOutput(pred), eps, None, d)
    with pytest.raises(ddpmkit.DdpmkitError, match="--learn-variance"):
        loss(pred, eps, context=plain)


def test_loss_aware_timesteps():
    T, h = 5, 3
    s = ddpmkit.build("timestep_sampler", "loss-aware", {"history": h}, num_timesteps=T)
    g = torch.Generator().manual_seed(0)
    ref = torch.Generator().manual_seed(0)
    t, w = s.sample(8, "cpu", g)
    assert w is None and torch.equal(t, torch.randint(0, T, (8,), generator=ref))  # uniform until full
    losses = {0: [1.0, 1.0, 1.0, 9.0], 1: [2.0] * 3, 2: [0.5] * 3, 3: [1.0] * 3, 4: [3.0] * 3}
    for ti, ls in losses.items():
        for value in ls:
            s.update(torch.tensor([ti]), torch.tensor([value]))
    assert s.warmed_up()
    rms = torch.tensor([math.sqrt((1 + 1 + 81) / 3), 2.0, 0.5, 1.0, 3.0], dtype=torch.float64)  # last 3 kept
    expected = rms / rms.sum() * 0.999 + 0.001 / T
    torch.testing.assert_close(s.probabilities(), expected)
    t, w = s.sample(20000, "cpu", g)
    freq = torch.bincount(t, minlength=T).double() / 20000
    assert (freq - expected).abs().max() < 0.015
    torch.testing.assert_close(w.double(), 1.0 / (T * expected[t]), rtol=1e-6, atol=0)
    assert abs(float(w.double().mean()) - 1.0) < 0.05  # E[1/(T p_t)] = 1: the objective is unchanged
    other = ddpmkit.build("timestep_sampler", "loss-aware", {"history": h}, num_timesteps=T)
    other.load_state_dict(json.loads(json.dumps(s.state_dict())))  # JSON, as in a checkpoint
    torch.testing.assert_close(other.probabilities(), s.probabilities(), rtol=0, atol=0)


def test_hybrid_learned_variance_run_nll_and_diffusers_export(tmp_path, tiny_args):
    from diffusers import DDPMPipeline

    runner = CliRunner()
    run = tmp_path / "run"
    r = runner.invoke(cli, ["run", "--out", str(run), *tiny_args, "--loss", "hybrid", "--learn-variance",
                            "--timestep-sampler", "loss-aware"])
    assert r.exit_code == 0, r.output
    pipe = ddpmkit.load_checkpoint(run)
    assert pipe.diffusion.variance_type == "learned_range" and pipe.config.loss.name == "hybrid"
    ddpmkit.run.pipeline._WARNED_VARIANCE.clear()  # once per process: forget earlier tests in this worker
    with pytest.warns(UserWarning, match="sampler 'ddim' ignores the model's learned variance"):
        pipe.sample(1, sampler="ddim", sampler_options={"steps": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once only, and never for ddpm, which uses the variance
        pipe.sample(1, sampler="ddim", sampler_options={"steps": 2})
        pipe.sample(1, sampler="ddpm")
    r = runner.invoke(cli, ["evaluate", str(run), "--metric", "nll", "-n", "4", "--no-progress", "--device", "cpu",
                            "--json", str(tmp_path / "nll.json")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "nll.json").read_text())
    got = res["results"]
    assert got["nll_bpd"] == pytest.approx(got["nll_prior_bpd"] + got["nll_kl_bpd"] + got["nll_decoder_bpd"], rel=1e-9)
    assert got["nll_bpd_stderr"] > 0 and "mnist-5k" in res["data"]["nll"] and res["sampler"] is None
    r = runner.invoke(cli, ["run", "--out", str(tmp_path / "bad"), *tiny_args, "--learn-variance", "--variance",
                            "fixed_large"])
    assert r.exit_code == 2 and "--learn-variance learns σ_t²" in r.stderr
    # the export loads in a stock DDPMPipeline, which samples with the learned variance as ddpmkit does
    out = tmp_path / "exported"
    r = runner.invoke(cli, ["export", str(run), str(out)])
    assert r.exit_code == 0, r.output
    pipeline = DDPMPipeline.from_pretrained(str(out))
    assert pipeline.scheduler.config.variance_type == "learned_range"
    images = pipeline(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=20,
                      output_type="np").images
    ours = ((pipe.sample(2, seed=3) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(images - ours).max() < 1e-3
