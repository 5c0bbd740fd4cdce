"""FID of a diffusion model of any family: N images sampled from pure noise by the full reverse process,
against the Inception statistics of a data set (paper table 7: vanilla DDPM 3.196, clean fine-tune 3.500,
ADDT 5.190, ADDT_linf 13.608 on CIFAR-10).

    python fid.py --ddpm weights/ddpm-cifar10-32 --data cifar10 --out runs/fid/vanilla
    python fid.py --ddpm runs/addt/ema --data cifar10 --out runs/fid/addt --ref-stats runs/fid/vanilla/ref_stats.npz
    torchrun --nproc_per_node=8 fid.py --ddpm DIR --data cifar10 --num-images 50000 --out runs/fid/vanilla
    python fid.py --model ddpm --sampler ddim --steps 100 --ddpm DIR ...      # DDIM, 100 steps
    python fid.py --model vpsde --vpsde checkpoint_8.pth ...                   # score_sde's Euler-Maruyama, 1000 steps
    python fid.py --model edm --edm edm-cifar10-32x32-uncond-vp.pkl ...        # EDM's Heun sampler, 18 steps
    python fid.py --out runs/fid/vanilla --resume ...                          # continue with the same flags

Defaults are table 7's (its sampler and N are not stated in the paper, and the authors' fid/ folder is not
in their repository; these reproduce DDPM's own CIFAR-10 FID protocol, 3.17 for google/ddpm-cifar10-32,
which table 7's vanilla 3.196 matches): 50,000 images by DDPM's ancestral sampler over all 1000 steps
(variance beta_t, clipped x0, as diffusers' DDPMPipeline), against the 50,000 CIFAR-10 training images,
pytorch-fid's Inception weights (--inception; the file is downloaded by hand, see the error without it).
Samplers: ddpm/ddim (diffusers' pipelines), vpsde (score_sde's: Euler-Maruyama from t = 1 to eps 1e-3,
N = 1000, the last step without noise), edm (NVlabs/edm generate.py: Heun from sigma 80, 18 steps).

Image i's noise is keyed by (seed, i) only, so the images do not depend on batch size, process count or
resume point. Images are written as uint8 chunks (OUT/samples/NNNNN.npz, `images` N x H x W x 3, atomic;
a chunk that exists is done) and --resume continues; torchrun shards the chunks. The reference statistics
(float64 mean and covariance of the features, with the data set, split, N and the Inception file's hash)
are cached in --ref-stats (default OUT/ref_stats.npz; pass one path to share them between runs).
Writes OUT/fid.json (FID, N, sampler, model, reference, Inception file, timing), OUT/sample_stats.npz (mu
and sigma of the samples' features, pytorch-fid's layout), OUT/samples.png (the first 64 images),
OUT/args.json, and prints a one-line table.
"""
import argparse
import hashlib
import math
import os
import time

import numpy as np
import torch
from PIL import Image

from addt_common import (Dist, Progress, UserError, atomic_write_bytes, autocast, check_device, check_finite_weights,
                         check_out_dir, check_positive, load_checkpoint, lock_out, markdown_table, prepare_model,
                         read_json, remove_stale_tmp, require, resolve_precision, run_main, sample_seed, unlock_out,
                         write_json)
from addt_data import load_split, shard, to_float
from addt_diffusion import (KeyedNoise, ddpm_generate, edm_generate, generation_schedule, load_diffusion_model,
                            vpsde_generate)
from models.inception import WEIGHTS_NAME, WEIGHTS_SHA256_PREFIX, WEIGHTS_URL, FIDInceptionV3

DEFAULT_STEPS = {"ddpm": 1000, "ddim": 100, "vpsde": 1000, "edm": 18}
SAMPLE_FLAGS = ["model", "model_path", "sampler", "steps", "eta", "sampling_eps", "seed", "n", "chunk", "precision"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["ddpm", "vpsde", "edm"], default="ddpm", help="the diffusion family")
    p.add_argument("--ddpm", help="diffusers UNet or DDPMPipeline folder (google/ddpm-cifar10-32, a train_addt export)")
    p.add_argument("--vpsde", help="score_sde checkpoint (checkpoint_8.pth) or a train_addt export")
    p.add_argument("--edm", help="EDM pickle (edm-cifar10-32x32-uncond-vp.pkl), ADDT .pth or a train_addt export")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default=None, help="--model ddpm: ancestral DDPM "
                   "(default) or DDIM")
    p.add_argument("--steps", type=int, default=None, help="reverse steps (default ddpm 1000, ddim 100, vpsde 1000, "
                   "edm 18); model calls: the steps, edm 2 steps - 1")
    p.add_argument("--eta", type=float, default=None, help="--sampler ddim: eta (default 0, deterministic)")
    p.add_argument("--sampling-eps", type=float, default=None, help="vpsde: where the reverse SDE stops (default "
                   "1e-3, score_sde's)")
    p.add_argument("--n", "--num-images", dest="n", type=int, default=50000,
                   help="images to sample (write --num-images under torchrun)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inception", default=os.path.join("weights", WEIGHTS_NAME),
                   help=f"pytorch-fid's Inception weights ({WEIGHTS_URL})")
    p.add_argument("--data", default="cifar10", help="data set of the reference statistics (name or path)")
    p.add_argument("--ref-split", choices=["train", "test"], default="train")
    p.add_argument("--ref-n", type=int, default=None, help="first N images of --ref-split (default all)")
    p.add_argument("--ref-stats", default=None, help="reference statistics .npz: read if it exists, else computed and "
                   "written there (default OUT/ref_stats.npz)")
    p.add_argument("--batch-size", type=int, default=500, help="images per sampler call (per process)")
    p.add_argument("--fid-batch-size", type=int, default=200, help="images per Inception call")
    p.add_argument("--chunk", type=int, default=1000, help="images per file in OUT/samples (the unit of resume)")
    p.add_argument("--precision", choices=["auto", "fp32", "tf32", "bf16"], default="fp32",
                   help="of the diffusion model (the Inception network always runs in fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the diffusion model")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    p.add_argument("--out", default="runs/fid")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (the same sampling flags)")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """Defaults per family and every flag, before anything is loaded."""
    require(args.sampler is None or args.model == "ddpm", f"--sampler applies to --model ddpm, not {args.model}")
    args.sampler = args.sampler or {"ddpm": "ddpm", "vpsde": "em", "edm": "heun"}[args.model]
    require(args.eta is None or args.sampler == "ddim", "--eta applies to --sampler ddim")
    require(args.sampling_eps is None or args.model == "vpsde", "--sampling-eps applies to --model vpsde")
    args.eta = 0.0 if args.sampler == "ddim" and args.eta is None else args.eta
    args.sampling_eps = 1e-3 if args.model == "vpsde" and args.sampling_eps is None else args.sampling_eps
    args.steps = DEFAULT_STEPS["ddim" if args.sampler == "ddim" else args.model] if args.steps is None else args.steps
    check_positive(args, "steps", "n", "batch_size", "fid_batch_size", "chunk")
    require(args.n >= 2, "--n must be at least 2 (a covariance needs two images)")
    require(args.ref_n is None or args.ref_n >= 2, f"--ref-n must be at least 2, not {args.ref_n}")
    require(args.seed >= 0, f"--seed must be non-negative, not {args.seed}")
    require(args.eta is None or 0 <= args.eta <= 1, f"--eta must lie in [0, 1], not {args.eta}")
    require(args.sampling_eps is None or 0 < args.sampling_eps < 1,
            f"--sampling-eps must lie in (0, 1), not {args.sampling_eps}")
    if args.model == "ddpm":
        generation_schedule(args.sampler, args.steps, args.eta or 0.0)  # --steps checked
    require(args.model != "edm" or args.steps >= 2, "--steps must be at least 2 for edm (the schedule divides by "
            "steps - 1)")
    args.model_path = getattr(args, args.model)
    require(args.model_path, f"no diffusion model given: pass --{args.model} PATH")
    require(os.path.exists(args.model_path), f"diffusion model not found: {args.model_path}")
    require(os.path.isfile(args.inception), f"Inception weights not found: {args.inception}; download "
            f"{WEIGHTS_NAME} (pytorch-fid's FID Inception, 91 MB) from {WEIGHTS_URL} and pass --inception PATH")
    check_device(args.device)
    check_out_dir(args.out)
    args.ref_stats = args.ref_stats or os.path.join(args.out, "ref_stats.npz")


# ---------------------------------------------------------------- Inception features and the Frechet distance

def load_inception(path):
    """pytorch-fid's weight file (torch.load weights_only, strict keys, finite) -> (network, sha256)."""
    state = load_checkpoint(path, "Inception weights")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"Inception weights {path}: not a state dict of tensors (expected {WEIGHTS_NAME})")
    check_finite_weights(state, f"Inception weights {path}")
    net = FIDInceptionV3()
    for k, v in net.state_dict().items():  # batch norm's step counter, absent from files of torch < 0.4.1: unused
        if k.endswith("num_batches_tracked"):
            state.setdefault(k, v)
    missing, unexpected = sorted(set(net.state_dict()) - set(state)), sorted(set(state) - set(net.state_dict()))
    if missing or unexpected:
        raise UserError(f"Inception weights {path} are not pytorch-fid's FID Inception ({len(missing)} keys missing, "
                        f"e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"Inception weights {path}: {str(e).splitlines()[-1].strip()}") from None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return net.eval().requires_grad_(False), h.hexdigest()


class FeatureStats:
    """Running float64 sums of features (count, sum, sum of outer products), summed across processes."""

    def __init__(self, dim, device):
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, f):
        f = f.double()
        self.n += len(f)
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def all_sum(self, d):
        for t in (self.n, self.sum, self.outer):
            d.all_sum(t)

    def mu_sigma(self):
        """The mean and the unbiased covariance (np.cov's, pytorch-fid's), float64 numpy."""
        n = self.n.item()
        mu = self.sum / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def add_features(stats, inception, images, idx, batch_size, progress=None):
    """Inception features of uint8 images (N, 3, H, W) into stats; non-finite features stop the run."""
    device = stats.sum.device
    for lo in range(0, len(images), batch_size):
        f = inception(to_float(images[lo:lo + batch_size].to(device)))
        if not torch.isfinite(f).all():
            bad = [idx[lo + int(i)] for i in (~torch.isfinite(f).all(1)).nonzero().flatten()[:5]]
            raise UserError(f"the Inception network gives non-finite features for images {bad}")
        stats.add(f)
        if progress is not None:
            progress.update(len(f))


def sqrtm_psd(a):
    """The symmetric square root of a symmetric positive semi-definite matrix (eigen-decomposition, float64;
    rounding's tiny negative eigenvalues count as 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) in float64 (Heusel et al. 2017).
    tr (sigma1 sigma2)^(1/2) is the sum of the square roots of the eigenvalues of sigma1 sigma2, which are those
    of the symmetric PSD matrix sigma1^(1/2) sigma2 sigma1^(1/2): no complex square root, exact for singular
    covariances too."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise UserError("the feature statistics hold NaN or inf: no FID is computed from them")
    s1_half = sqrtm_psd(sigma1)
    m = s1_half @ sigma2 @ s1_half
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# ---------------------------------------------------------------- reference statistics

def read_ref_stats(path, expect):
    """mu, sigma (and our metadata, when there) of a statistics .npz; refused when it was computed with another
    Inception file or from other data than `expect` says. pytorch-fid's own files (mu, sigma only) are taken."""
    try:
        with np.load(path, allow_pickle=False) as z:
            stats = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"reference statistics {path} are unreadable ({e}); remove the file to recompute "
                        "them") from None
    mu, sigma = stats.get("mu"), stats.get("sigma")
    if mu is None or sigma is None or mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or len(mu) != 2048:
        raise UserError(f"reference statistics {path}: expected mu (2048,) and sigma (2048, 2048)")
    meta = {k: stats[k].item() for k in ("data", "split", "ref_n", "n", "inception_sha256") if k in stats}
    wrong = [f"{k} {meta[k]!r} (this run: {expect[k]!r})" for k in meta if k in expect and meta[k] != expect[k]]
    if wrong:
        raise UserError(f"reference statistics {path} were computed with {', '.join(wrong)}; pass another --ref-stats "
                        "or remove the file to recompute them")
    return mu.astype(np.float64), sigma.astype(np.float64), meta


def write_npz(path, **arrays):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    atomic_write_bytes(path, write)


def ref_expect(args, sha256):
    """What reference statistics must have been computed from to serve this run."""
    return {"data": args.data, "split": args.ref_split, "ref_n": str(args.ref_n or "all"), "inception_sha256": sha256}


def reference_stats(args, d, inception, sha256):
    """The data set's statistics: read from --ref-stats, or computed (images sharded) and written there."""
    expect = ref_expect(args, sha256)
    if os.path.isfile(args.ref_stats):
        mu, sigma, meta = read_ref_stats(args.ref_stats, expect)
        return mu, sigma, {"path": args.ref_stats, "computed": False, **meta}
    images = load_split(args.data, args.ref_split).images
    require(args.ref_n is None or args.ref_n <= len(images),
            f"--ref-n {args.ref_n} but {args.data} {args.ref_split} holds {len(images)} images")
    images = images[:args.ref_n or len(images)]
    lo, hi = shard(len(images), d.rank, d.world)
    stats = FeatureStats(2048, d.device)
    t0 = time.time()
    progress = Progress(hi - lo, f"features of {args.data} {args.ref_split}", "img", enabled=d.master)
    with torch.no_grad():
        add_features(stats, inception, images[lo:hi], range(lo, hi), args.fid_batch_size, progress)
    stats.all_sum(d)
    mu, sigma = stats.mu_sigma()
    meta = {**expect, "n": len(images)}
    if d.master:
        write_npz(args.ref_stats, mu=mu, sigma=sigma, **{k: np.array(v) for k, v in meta.items()})
        print(f"reference statistics of {len(images)} {args.ref_split} images ({time.time() - t0:.0f} s) -> "
              f"{args.ref_stats}", flush=True)
    return mu, sigma, {"path": args.ref_stats, "computed": True, "seconds": time.time() - t0, **meta}


# ---------------------------------------------------------------- sampling

def image_shape(family, model):
    """(channels, height, width) of the family's samples, from the model's config."""
    c = getattr(model, "config", {})
    if family == "ddpm":
        require(c.get("sample_size"), "the UNet's config has no sample_size: the image size is unknown")
        size = c["sample_size"]
        return (c["in_channels"], *((size, size) if isinstance(size, int) else size))
    if family == "vpsde":
        return c["num_channels"], c["image_size"], c["image_size"]
    return model.img_channels, model.img_resolution, model.img_resolution


def make_sampler(args, model):
    """generate(like, noise) -> images in [0, 1] from pure noise, and the settings recorded in fid.json."""
    if args.model == "ddpm":
        sched = generation_schedule(args.sampler, args.steps, args.eta or 0.0)
        info = {"sampler": args.sampler, "steps": args.steps, "eta": args.eta, "model_calls": len(sched.timesteps),
                "first_timestep": sched.timesteps[0], "stride": 1000 // args.steps, "clip_x0": True,
                "variance": "beta_t (fixed_large)" if args.sampler == "ddpm" else None}
        return (lambda like, noise: ddpm_generate(model, like, sched, noise)), info
    if args.model == "vpsde":
        info = {"sampler": "euler-maruyama (score_sde)", "steps": args.steps, "sampling_eps": args.sampling_eps,
                "model_calls": args.steps, "noise_removal": True}
        return (lambda like, noise: vpsde_generate(model, like, noise, args.steps, args.sampling_eps)), info
    info = {"sampler": "heun (EDM generate.py)", "steps": args.steps, "model_calls": 2 * args.steps - 1,
            "sigma_max": min(80.0, float(getattr(model, "sigma_max", math.inf))),
            "sigma_min": max(0.002, float(getattr(model, "sigma_min", 0.0))), "rho": 7.0, "S_churn": 0.0}
    return (lambda like, noise: edm_generate(model, like, noise, args.steps)), info


def to_uint8(x):
    """[0, 1] -> uint8 N x H x W x C, rounded (as PNGs written by diffusers and EDM)."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def chunk_path(args, k):
    return os.path.join(args.out, "samples", f"{k:05d}.npz")


def sample_chunk(args, generate, shape, k, device, precision, progress):
    """Images [k chunk, (k + 1) chunk) of the run, in batches; image i's noise is keyed by (seed, i)."""
    lo, hi = k * args.chunk, min((k + 1) * args.chunk, args.n)
    out = []
    for b in range(lo, hi, args.batch_size):
        idx = range(b, min(b + args.batch_size, hi))
        noise = KeyedNoise(torch.tensor([sample_seed(args.seed, i) for i in idx], device=device))
        with torch.no_grad(), autocast(device, precision):
            x = generate(torch.empty(len(idx), *shape, device=device), noise).float()
        if not torch.isfinite(x).all():
            bad = [idx[int(i)] for i in (~torch.isfinite(x.flatten(1)).all(1)).nonzero().flatten()[:5]]
            raise UserError(f"the sampler gives non-finite images (images {bad}); the model may be diverged")
        out.append(to_uint8(x))
        progress.update(len(idx))
    write_npz(chunk_path(args, k), images=np.concatenate(out), start=np.array(lo))


def read_chunk(args, k):
    path = chunk_path(args, k)
    try:
        with np.load(path, allow_pickle=False) as z:
            images = z["images"]
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise UserError(f"samples {path} are unreadable ({e}); remove the file and rerun with --resume") from None
    expected = min((k + 1) * args.chunk, args.n) - k * args.chunk
    require(len(images) == expected, f"samples {path} hold {len(images)} images, expected {expected}")
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def save_grid(path, images, cols=8):
    """uint8 N x 3 x H x W -> one PNG, cols images a row (whole rows only)."""
    cols = min(cols, len(images))
    n = len(images) // cols * cols
    grid = images[:n].reshape(n // cols, cols, *images.shape[1:]).permute(0, 3, 1, 4, 2)
    Image.fromarray(grid.reshape(grid.shape[0] * grid.shape[1], -1, grid.shape[-1]).numpy()).save(path)


def check_resume(args):
    """A new run refuses an earlier one's folder; --resume refuses changed sampling flags (the chunks would mix
    two runs). Called under the lock."""
    path = os.path.join(args.out, "args.json")
    if os.path.exists(path):
        require(args.resume, f"{path} exists: pass --resume to continue that run, or another --out")
        before = read_json(path, "run flags").get("samples", {})
        now = {k: getattr(args, k) for k in SAMPLE_FLAGS}
        changed = [f"--{k.replace('_', '-')} {before.get(k)!r} -> {now[k]!r}"
                   for k in SAMPLE_FLAGS if before.get(k) != now[k]]
        require(not changed, f"--resume with other sampling flags than the run in {args.out}: {', '.join(changed)}")
    else:
        write_json(path, {"samples": {k: getattr(args, k) for k in SAMPLE_FLAGS}, "args": vars(args)})
    remove_stale_tmp(os.path.join(args.out, "samples"))


def main(argv=None):
    args = parse_args(argv)
    d = Dist(args.device)
    d.agree(lambda: (lock_out(args.out), check_resume(args)))
    inception, sha256 = load_inception(args.inception)
    if d.master and not sha256.startswith(WEIGHTS_SHA256_PREFIX):
        print(f"note: {args.inception} is not pytorch-fid's published file (sha256 {sha256[:8]}..., expected "
              f"{WEIGHTS_SHA256_PREFIX}...): its FID is not comparable with published numbers", flush=True)
    if os.path.isfile(args.ref_stats):  # a file named on the command line is checked before the long part
        read_ref_stats(args.ref_stats, ref_expect(args, sha256))
    model = load_diffusion_model(args.model, args.model_path)
    shape = image_shape(args.model, model)
    model = prepare_model(model, d.device, compile=args.compile)
    inception = inception.to(d.device)
    precision = resolve_precision(args.precision, d.device)
    generate, sampler_info = make_sampler(args, model)

    n_chunks = math.ceil(args.n / args.chunk)
    lo, hi = shard(n_chunks, d.rank, d.world)
    size = [min((k + 1) * args.chunk, args.n) - k * args.chunk for k in range(n_chunks)]
    done = [os.path.isfile(chunk_path(args, k)) for k in range(n_chunks)]
    todo = [k for k in range(lo, hi) if not done[k]]
    n_todo = sum(size[k] for k in todo)
    if d.master and any(done):
        print(f"resume: {sum(s for s, x in zip(size, done) if x)} of {args.n} images already sampled", flush=True)
    progress = Progress(n_todo, f"sample ({sampler_info['model_calls']} calls/img)", "img", enabled=d.master)
    for k in todo:
        sample_chunk(args, generate, shape, k, d.device, precision, progress)
    seconds_sample = progress.elapsed
    d.barrier()

    t0 = time.time()
    stats = FeatureStats(2048, d.device)
    progress = Progress(sum(size[lo:hi]), "features of the samples", "img", enabled=d.master)
    with torch.no_grad():
        for k in range(lo, hi):
            images = read_chunk(args, k)
            add_features(stats, inception, images, range(k * args.chunk, k * args.chunk + len(images)),
                         args.fid_batch_size, progress)
    stats.all_sum(d)
    mu, sigma = stats.mu_sigma()
    seconds_features = time.time() - t0
    ref_mu, ref_sigma, reference = reference_stats(args, d, inception, sha256)
    if not d.master:
        return
    if min(args.n, reference.get("n", 2048)) < 2048:
        print("note: fewer images than features (2048): the covariances are singular and the FID is biased "
              "upwards; table 7 uses 50,000", flush=True)
    write_npz(os.path.join(args.out, "sample_stats.npz"), mu=mu, sigma=sigma, n=np.array(args.n),
              inception_sha256=np.array(sha256))
    fid = frechet_distance(mu, sigma, ref_mu, ref_sigma)
    first = [read_chunk(args, k) for k in range(min(n_chunks, math.ceil(64 / args.chunk)))]
    save_grid(os.path.join(args.out, "samples.png"), torch.cat(first)[:64])
    results = {"fid": fid, "n": args.n, "model": {"family": args.model, "path": args.model_path},
               "sampler": sampler_info, "seed": args.seed, "precision": precision,
               "inception": {"path": args.inception, "sha256": sha256,
                             "published_weights": sha256.startswith(WEIGHTS_SHA256_PREFIX)},
               "reference": reference, "timing": {"sample_s": seconds_sample, "sampled_now": n_todo,
                                                  "features_s": seconds_features, "world": d.world,
                                                  "images_per_s_per_process": n_todo / seconds_sample
                                                  if n_todo else None},
               "args": vars(args)}
    write_json(os.path.join(args.out, "fid.json"), results)
    row = {"model": f"{args.model} {args.model_path}", "sampler": sampler_info["sampler"], "steps": args.steps,
           "N": args.n, "reference": f"{args.data} {args.ref_split} ({reference.get('n', '?')})", "FID": f"{fid:.3f}"}
    print(markdown_table([row], list(row)))
    unlock_out(args.out)
    return results


if __name__ == "__main__":
    run_main(main)
