"""Reference recipes (conf/recipe/*.yaml): they compose for every (method, dataset), their values equal the
official configurations (transcribed below with the file each comes from), and the adapters accept them."""

from __future__ import annotations

import math

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from adapters.base import Adapter
from adapters.training import TrainSpec, _lr_lambda
from fewclip.config import compose, group_options
from fewclip.recipes import RecipeError, compose_recipe, load_recipe_file, recipe_methods, source_repo

BENCHMARK = ["imagenet", "imagenet_ens", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
             "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]
SHOTS = [1, 2, 4, 8, 16]

# ---------------------------------------------------------------------------------------------- official values
# Read from the official repositories; keys are fewclip's adapter hyperparameters. (repo, file, {key: value}).
TIP_CONFIGS = {  # gaopengcuhk/Tip-Adapter configs/<file>.yaml: search_scale [beta, alpha], init_beta, init_alpha
    "caltech101": ("caltech101", (12, 5), 1, 3), "dtd": ("dtd", (13, 13), 1, 2), "eurosat": ("eurosat", (12, 10), 1, 2),
    "fgvc_aircraft": ("fgvc", (30, 30), 1, 5), "food101": ("food101", (10, 10), 1, 1.17),
    "imagenet": ("imagenet", (7, 3), 1, 1.17), "oxford_flowers": ("oxford_flowers", (50, 50), 1, 10),
    "oxford_pets": ("oxford_pets", (7, 3), 1, 1.17), "stanford_cars": ("stanford_cars", (20, 10), 1, 3),
    "sun397": ("sun397", (12, 10), 1, 1.17), "ucf101": ("ucf101", (7, 3), 1, 3),
}
TIP_F_EPOCHS = {"eurosat": 100}  # configs/eurosat.yaml train_epoch: 100; every other config: 20
APE_CONFIGS = {  # yangyangyang127/APE configs/<file>.yaml: search_scale, search_step[2], training_free_feat_num,
    # w_training_free, training_feat_num, init_alpha, eps, lr, train_epoch
    "caltech101": ("caltech101", (7, 7, 1), 20, 800, (0.5, 0.5), 900, 1, 0.001, 0.001, 30),
    "dtd": ("dtd", (7, 7, 1), 20, 400, (0.5, 0.5), 700, 3, 0.001, 0.001, 20),
    "eurosat": ("eurosat", (30, 5, 1.5), 20, 700, (0.9, 0.1), 900, 1, 0.001, 0.001, 200),
    "fgvc_aircraft": ("fgvc", (20, 10, 1), 20, 800, (0.1, 0.9), 900, 5, 0.001, 0.001, 30),
    "food101": ("food101", (7, 7, 1), 20, 700, (0.3, 0.7), 900, 0.8, 0.001, 0.0001, 30),
    "imagenet": ("imagenet", (7, 7, 0.5), 5, 500, (0.7, 0.3), 500, 2, 0.001, 0.0001, 20),
    "oxford_flowers": ("oxford_flowers", (7, 7, 1), 20, 700, (0.4, 0.6), 800, 3, 0.001, 0.001, 60),
    "oxford_pets": ("oxford_pets", (7, 7, 1), 20, 800, (0.7, 0.3), 800, 2, 0.002, 0.0001, 30),
    "stanford_cars": ("stanford_cars", (10, 7, 1), 20, 500, (0.6, 0.4), 800, 1, 0.005, 0.001, 30),
    "sun397": ("sun397", (10, 7, 1), 20, 800, (0.7, 0.3), 800, 1, 0.001, 0.0001, 30),
    "ucf101": ("ucf101", (10, 7, 1.5), 20, 700, (0.3, 0.7), 800, 2, 0.002, 0.001, 30),
}
COOP_EPOCHS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}  # KaiyangZhou/CoOp COOP.md (rn50_ep50 / rn50_ep100 / rn50)
TASKRES_EPOCHS = {1: 100, 2: 100, 4: 100, 8: 200, 16: 200}  # geekyutao/TaskRes train_regular.sh
FIXED = {  # method -> (repo, file, values every dataset shares)
    "coop": ("KaiyangZhou/CoOp", "configs/trainers/CoOp/rn50.yaml",
             {"lr": 0.002, "batch_size": 32, "warmup_epochs": 1, "warmup_lr": 1e-5, "optimizer": "sgd",
              "n_ctx": 16, "csc": False, "class_token_position": "end", "select": "last", "momentum": 0.9,
              "weight_decay": 5e-4}),
    "cocoop": ("KaiyangZhou/CoOp", "configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml",
               {"lr": 0.002, "batch_size": 1, "epochs": 10, "n_ctx": 4, "ctx_init": "a photo of a",
                "warmup_epochs": 1, "select": "last"}),
    "kgcoop": ("htyao89/KgCoOp", "KgCoOp/configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml",
               {"lr": 0.002, "batch_size": 128, "epochs": 100, "n_ctx": 4, "weight": 8.0, "select": "last"}),
    "maple": ("muzairkhattak/multimodal-prompt-learning", "configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml",
              {"lr": 0.0035, "batch_size": 4, "epochs": 5, "n_ctx": 2, "depth": 9, "ctx_init": "a photo of a",
               "select": "last"}),
    "dpt": ("fanrena/DPT", "train_single.sh",
            {"lr": 0.01, "epochs": 60, "n_ctx": 16, "vpt_tokens": 10, "class_prompts": 10, "alpha": 0.3,
             "pretrain_epochs": 30, "batch_size": 32, "warmup_epochs": 10}),
    "clap": ("jusiro/CLAP", "configs/trainers/SGD_lr1e-1_B256_ep300.yaml",
             {"lr": 0.1, "batch_size": 256, "epochs": 300, "weight_decay": 0.0, "optimizer": "sgd", "constraint": "l2",
              "warmup_epochs": 1, "select": "last", "schedule_step": "epoch"}),
    "taskres": ("geekyutao/TaskRes", "configs/trainers/TaskRes/adam_lr2e-3_B256_ep100.yaml",
                {"batch_size": 256, "betas": [0.9, 0.999], "weight_decay_l2": 5e-4, "warmup_epochs": 1,
                 "select": "last"}),
    "gda": ("mrflogs/ICLR24", "main_few_shots.py", {"alpha_grid": [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0]}),
    "lp_pp": ("FereshteShakeri/FewShot-CLIP-Strong-Baseline", "configs/base.yaml",
              {"epochs": 300, "alpha_every": 10, "init_scale": 250.0, "momentum": 0.9}),
    "linear_probe": ("KaiyangZhou/CoOp", "lpclip/linear_probe.py",
                     {"search": "lpclip", "lpclip_steps": 8, "max_iter": 1000}),
}


def official(method: str, dataset: str, shots: int) -> dict[str, object]:
    """The official values for (method, dataset, shots), from the tables above."""
    key = "imagenet" if dataset == "imagenet_ens" else dataset
    out: dict[str, object] = dict(FIXED.get(method, ("", "", {}))[2])
    if method in ("tip", "tip_f"):
        _, (bmax, amax), beta, alpha = TIP_CONFIGS[key]
        out.update(beta_max=bmax, alpha_max=amax, beta=beta, alpha=alpha, beta_steps=200, alpha_steps=20, grid="linear")
        if method == "tip_f":
            out["train_at"] = "fixed"  # run_tip_adapter_F trains at init_beta, init_alpha
            out.update(epochs=TIP_F_EPOCHS.get(key, 20), lr=0.001, eps=1e-4, batch_size=256, select="best_val")
    if method in ("ape", "ape_t"):
        _, scale, gamma_steps, free, w_free, feat, alpha, eps, lr, epochs = APE_CONFIGS[key]
        out.update(beta_max=scale[0], alpha_max=scale[1], grid="linear")
        if method == "ape":
            out.update(gamma_max=scale[2], gamma_steps=gamma_steps, channel_ratio=free / 1024,
                       criterion_weights=list(w_free))
        else:
            food_eps = {1: 0.01, 2: 0.01}.get(shots, 0.001) if key == "food101" else eps  # its comment
            out.update(channel_ratio=feat / 1024, criterion_weights=[0.2, 0.8], alpha=alpha, beta=1, eps=food_eps,
                       lr=lr, epochs=epochs, weight_decay=0.1, train_at="fixed")
    if method in ("coop", "coop_pixels"):
        out.update(FIXED["coop"][2])
        out["epochs"] = 50 if key == "imagenet" else COOP_EPOCHS[shots]
    if method == "taskres":
        out["epochs"] = TASKRES_EPOCHS[shots]
        out["lr"] = 2e-4 if key == "imagenet" else 2e-3
        out["residual_scale"] = 1.0 if key == "oxford_flowers" else 0.5
    return out


OFFICIAL_METHODS = sorted({"tip", "tip_f", "ape", "ape_t", "coop", "coop_pixels", "taskres"} | set(FIXED))


# ---------------------------------------------------------------------------------------------- tests
# fewclip's own: auto (a selection among methods) and knn (the classical k-NN vote over the cache, no CLIP
# few-shot paper to follow): protocol=reference refuses them.
NO_PAPER = {"auto", "knn"}


def test_every_paper_method_has_a_recipe():
    assert set(recipe_methods()) == set(group_options("adapter")) - NO_PAPER
    for method in NO_PAPER:
        with pytest.raises(RecipeError, match="no reference recipe"):
            compose_recipe(method, "dtd", 16)


@pytest.mark.parametrize("method", recipe_methods())
def test_recipes_compose_for_every_dataset_and_the_adapter_accepts_them(method):
    for dataset in BENCHMARK:
        for shots in SHOTS:
            recipe = compose_recipe(method, dataset, shots)
            assert recipe.run["sampler"] == "dassl" and recipe.run["val"] in ("fewshot", "full", "kshot")
            assert set(recipe.sources) == {f"adapter.{k}" for k in recipe.adapter} | {f"run.{k}" for k in recipe.run
                                                                                      if f"run.{k}" in recipe.sources}
            assert all(isinstance(d, str) and d for d in recipe.departures)
        cfg = compose([f"adapter={method}"])
        OmegaConf.set_struct(cfg, False)  # keys the YAML leaves at their defaults (schedule_step) may be set
        node = OmegaConf.merge(cfg.adapter, recipe.adapter)  # unknown keys would fail the adapter's __init__
        assert isinstance(instantiate(node), Adapter)


@pytest.mark.parametrize("method", recipe_methods())
def test_every_value_cites_a_file(method):
    data = load_recipe_file(method)
    recipe = compose_recipe(method, "oxford_flowers", 16)
    for key, source in recipe.sources.items():
        repo, path = source_repo(data["reference"], source)
        assert repo.count("/") == 1 and path and not path.startswith("("), (key, source)


@pytest.mark.parametrize("method", OFFICIAL_METHODS)
@pytest.mark.parametrize("dataset", BENCHMARK)
def test_values_equal_the_official_configs(method, dataset):
    for shots in SHOTS:
        recipe = compose_recipe(method, dataset, shots)
        expected = official(method, dataset, shots)
        for key, value in expected.items():
            got = recipe.adapter.get(key)
            assert got is not None, f"{method}/{dataset}: the recipe does not set {key}"
            if isinstance(value, float) or isinstance(got, float):
                assert math.isclose(float(got), float(value), rel_tol=1e-9), (method, dataset, shots, key, got, value)
            else:
                assert got == value, (method, dataset, shots, key, got, value)
    # the per-dataset values cite that dataset's own config file
    if method in ("tip", "tip_f", "ape", "ape_t"):
        file = (TIP_CONFIGS if method.startswith("tip") else APE_CONFIGS)["imagenet" if dataset == "imagenet_ens"
                                                                            else dataset][0]
        assert recipe.sources["adapter.beta_max"].startswith(f"configs/{file}.yaml")
    if method in FIXED and method not in ("dpt",):
        repo, file, values = FIXED[method]
        assert load_recipe_file(method)["reference"].startswith(repo + "@")
        cited = {recipe.sources[f"adapter.{k}"].split()[0] for k in values}
        assert file in cited or any(c.startswith(file) for c in cited)


def test_val_split_and_features_follow_the_official_code():
    run = {m: compose_recipe(m, "dtd", 16).run for m in recipe_methods()}
    assert {m for m, r in run.items() if r["val"] == "full"} == {"tip", "tip_f", "gda", "ape", "ape_t"}
    assert run["lp_pp"]["val"] == "kshot" and run["lp_pp"]["views"] == 1
    assert run["linear_probe"]["support_features"] == "plain"
    assert run["clap"]["views"] == 20 and run["tip"]["views"] == 10


def test_selection_on_test_is_listed_as_a_departure():
    for method in ("tip", "gda", "ape", "ape_t", "tip_f"):
        deps = " ".join(compose_recipe(method, "imagenet", 16).departures)
        assert "test" in deps and "val" in deps
    assert any("best test accuracy" in d for d in compose_recipe("tip_f", "dtd", 4).departures)
    assert any("GPT-3" in d for d in compose_recipe("ape", "dtd", 4).departures)


def test_unlisted_datasets_refuse_or_fall_back():
    with pytest.raises(RecipeError, match="per dataset"):
        compose_recipe("tip", "digits", 4)
    coop = compose_recipe("coop", "digits", 4)
    assert coop.adapter["epochs"] == 100 and any("no settings for dataset 'digits'" in d for d in coop.departures)
    gda = compose_recipe("gda", "digits", 4)
    assert any("no settings for dataset 'digits'" in d for d in gda.departures)
    # a shot count the reference never ran takes the nearest listed one, and says so
    three = compose_recipe("coop", "dtd", 3)
    assert three.adapter["epochs"] == 100 and any("no 3-shot value" in d for d in three.departures)


def test_dassl_cosine_steps_per_epoch():
    """Dassl: ConstantWarmupScheduler(1e-5) for W epochs, then CosineAnnealingLR(T_max=E) recounted from 0."""
    spec = TrainSpec(epochs=5, lr=0.002, warmup_epochs=1, warmup_lr=1e-5, schedule_step="epoch")
    f = _lr_lambda(spec, steps_per_epoch=3)
    per_step = [0.002 * f(s) for s in range(15)]
    expected = [1e-5] + [0.002 * 0.5 * (1 + math.cos(math.pi * (e - 1) / 5)) for e in range(1, 5)]
    for e in range(5):
        assert per_step[3 * e: 3 * e + 3] == pytest.approx([expected[e]] * 3, rel=1e-12)
    assert per_step[-1] > 0  # never reaches 0 within the run, unlike the per-batch schedule
    batch = _lr_lambda(TrainSpec(epochs=5, lr=0.002), steps_per_epoch=3)
    assert batch(15) == pytest.approx(0.0, abs=1e-12)
