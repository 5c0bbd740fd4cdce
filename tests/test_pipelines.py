"""diffusers pipelines both ways: train_addt.py's EMA export is a DDPMPipeline folder that diffusers opens
(and our loaders read back, weights identical), and a pipeline whose scheduler our samplers do not
implement is refused instead of purified with the wrong schedule."""
import json
import shutil

import pytest
import torch

import train_addt
from addt_common import UserError
from addt_diffusion import load_unet


@pytest.fixture(scope="module")
def exported(smoke_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("addt")
    train_addt.main(["--ddpm", smoke_inputs["ddpm"], "--data", smoke_inputs["data"], "--out", str(out), "--device",
                     "cpu", "--global-batch", "4", "--perturb", "none", "--max-steps", "1"])
    return out / "ema"


def test_export_is_a_ddpm_pipeline_diffusers_opens(exported):
    from diffusers import DDPMPipeline, DDPMScheduler
    pipe = DDPMPipeline.from_pretrained(str(exported))
    ours = load_unet(str(exported)).state_dict()
    theirs = pipe.unet.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # the same weights under the same names
    sched = pipe.scheduler
    assert isinstance(sched, DDPMScheduler) and sched.config.variance_type == "fixed_large"
    assert sched.config.clip_sample and sched.config.prediction_type == "epsilon"
    torch.testing.assert_close(sched.alphas_cumprod, __import__("addt_diffusion").linear_alpha_bar(), rtol=0, atol=0)


@pytest.mark.parametrize("change,named", [({"prediction_type": "v_prediction"}, "prediction_type"),
                                          ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
                                          ({"num_train_timesteps": 4000}, "num_train_timesteps"),
                                          ({"clip_sample": False}, "clip_sample"),
                                          ({"beta_end": 0.012}, "beta_end"),
                                          ({"timestep_spacing": "trailing"}, "timestep_spacing")])
def test_unsupported_scheduler_configs_are_refused(exported, tmp_path, change, named):
    folder = tmp_path / "pipe"
    shutil.copytree(exported, folder)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    json.dump({**json.load(open(cfg_path)), **change}, open(cfg_path, "w"))
    with pytest.raises(UserError, match=named):
        load_unet(str(folder))
    load_unet(str(exported))  # the untouched export loads


def test_summaries_record_the_classifier_normalisation(smoke_inputs, tmp_path):
    import attack
    import purify
    base = ["--classifier", smoke_inputs["classifier"], "--data", smoke_inputs["data"], "--n", "2", "--device", "cpu",
            "--ddpm", smoke_inputs["ddpm"], "--nfe", "5"]
    s = attack.main(base + ["--steps", "1", "--eot", "1", "--out", str(tmp_path / "a"), "--classifier-norm", "none"])
    assert s["classifier_norm"]["name"] == "none" and s["classifier_norm"]["source"] == "override"
    r = purify.main(base + ["--grid", "0", "--out", str(tmp_path / "p")])
    assert r["classifier_norm"]["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])  # stored in our checkpoint
    assert json.load(open(tmp_path / "a" / "summary.json"))["classifier_norm"]["name"] == "none"
