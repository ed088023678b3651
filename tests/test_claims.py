"""benchmarks/claims.py (the paper's two claims, stage 11): when a learning curve first reaches a target, and a
smoke run of both parts in fast mode."""

import importlib.util
import json
from pathlib import Path

import pytest

from minildm.checkpoint import load_checkpoint, save_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "claims.py"
spec = importlib.util.spec_from_file_location("claims", SCRIPT)
claims = importlib.util.module_from_spec(spec)
spec.loader.exec_module(claims)


def test_first_reach_interpolates_between_the_points_around_the_target():
    points = [{"seconds": 10, "caption": 0.2}, {"seconds": 20, "caption": 0.4}, {"seconds": 40, "caption": 0.8}]
    # 0.5 lies a quarter of the way from 0.4 (20 s) to 0.8 (40 s): 25 s
    assert claims.first_reach(points, 0.5) == {"first_point_s": 40, "interpolated_s": pytest.approx(25.0),
                                                "at_first_point": False}
    assert claims.first_reach(points, 0.4)["interpolated_s"] == pytest.approx(20.0)
    # reached by the first evaluation: its seconds are only an upper bound, and say so
    assert claims.first_reach(points, 0.1) == {"first_point_s": 10, "interpolated_s": 10, "at_first_point": True}
    assert claims.first_reach(points, 0.9)["first_point_s"] is None


def test_a_second_invocation_adds_its_entries_and_refuses_other_settings(tmp_path):
    path = tmp_path / "part.json"
    info = {"n": 8, "guidance": 3.0, "sampler": "dpmpp_2m, 20 steps", "feature_network": "judge", "fast": False,
            "gpu": "NVIDIA H200"}
    claims.merged(path, "spaces", {"pixel": {"batch": 32}}, {**info, "curve_s": [30, 60]})
    result = claims.merged(path, "spaces", {"latent": {"batch": 256}}, {**info, "curve_s": [15, 60]})
    assert result == json.loads(path.read_text())
    assert result["spaces"] == {"pixel": {"batch": 32}, "latent": {"batch": 256}} and result["curve_s"] == [15, 30, 60]
    with pytest.raises(SystemExit, match="other settings .n 8, now 16"):
        claims.merged(path, "spaces", {"latent": {"batch": 256}}, {**info, "n": 16, "curve_s": [15]})
    with pytest.raises(SystemExit, match="gpu 'NVIDIA H200', now 'NVIDIA H100'"):  # seconds on another GPU model
        claims.merged(path, "spaces", {"latent": {"batch": 256}}, {**info, "gpu": "NVIDIA H100", "curve_s": [15]})
    # a setting only one side records counts as different: 120-s first stages are not mixed into an older result
    with pytest.raises(SystemExit, match="ae_seconds None, now 120"):
        claims.merged(path, "spaces", {"latent": {"batch": 256}}, {**info, "ae_seconds": 120, "curve_s": [15]})


def test_a_pixel_target_too_low_to_be_a_level_gives_no_ratio_and_a_rerun_drops_a_stale_one(tmp_path):
    def curve(*pairs):  # (seconds, captions right) -> points with objects right twice as often
        return {"batch": 1, "curve": [{"seconds": s, "budget_s": s, "steps": 1, "caption": c, "object": min(1, 2 * c),
                                       "fd_ratio": 1.0} for s, c in pairs]}

    result = {"device": "test", "gpu": "test", "n": 256, "guidance": 3.0, "sampler": "x", "feature_network": "judge",
              "spaces": {"pixel": curve((60, 0.1), (240, 0.4)), "latent": curve((15, 0.2), (30, 0.5))}}
    done = claims.finish_latent_vs_pixel(result, tmp_path)
    assert done["latent_over_pixel_time"] == pytest.approx(25.0 / 240.0)  # 0.4: latent at 25 s (interpolated), pixel 240
    result["spaces"]["pixel"] = curve((60, 0.0), (240, 0.02))  # 5 of 256 captions: noise, not a level
    done = claims.finish_latent_vs_pixel(result, tmp_path)
    assert "latent_over_pixel_time" not in done and not done["targets"]["caption"]["usable"]
    assert done["targets"]["object"]["usable"]  # 4% of objects: 10 of 256 or more


def test_both_parts_run_in_fast_mode(tmp_path, course_home, monkeypatch):
    # The judge lands in course_home, shared with test_pipeline's runs (trained once per test session).
    monkeypatch.setenv("MINILDM_HOME", str(course_home))
    common = ["--fast", "--out", str(tmp_path), "--curve", "0.5", "-n", "4", "--steps", "2"]
    claims.main(["latent-vs-pixel", *common])
    result = json.loads((tmp_path / "claims_latent_vs_pixel.json").read_text())
    assert set(result["spaces"]) == {"pixel", "latent"} and "not Inception" in result["feature_network"]
    assert result["target_caption"] == result["spaces"]["pixel"]["curve"][-1]["caption"]
    assert set(result["reach"]) == {"pixel", "latent"}
    assert all(run["finished"] for run in result["spaces"].values())
    kept = result["spaces"]["latent"]["first_stage"]  # what the f=4 first stage keeps, measured before diffusion
    assert kept["psnr"] > 0 and 0 <= kept["object"] <= 1 and 0 <= kept["object_real"] <= 1  # fast judge: weak
    assert "first_stage" not in result["spaces"]["pixel"]
    claims.main(["f-study", "--f", "8", *common])
    result = json.loads((tmp_path / "claims_f_study.json").read_text())
    assert set(result["factors"]) == {"8"} and result["factors"]["8"]["latent_shape"] == [4, 4, 4]
    assert {"psnr", "object", "caption"} <= set(result["factors"]["8"]["first_stage"])
    for name in ("claims_latent_vs_pixel.png", "claims_f_study.png"):
        assert (tmp_path / name).stat().st_size > 0
    with pytest.raises(SystemExit, match="positive seconds"):
        claims.main(["f-study", "--curve", "0", *common[:3]])


def test_fd_falls_to_its_target_and_gives_a_ratio_where_no_accuracy_is_a_level(tmp_path):
    points = [{"seconds": 16, "fd_ratio": 2.36}, {"seconds": 30, "fd_ratio": 1.19}, {"seconds": 60, "fd_ratio": 1.24}]
    # lower is better: 2.17 is reached between 16 s and 30 s, (2.36 - 2.17) / (2.36 - 1.19) of the way
    reach = claims.first_reach(points, 2.17, "fd_ratio")
    assert reach["first_point_s"] == 30 and reach["interpolated_s"] == pytest.approx(16 + 14 * 0.19 / 1.17)
    assert claims.first_reach(points, 1.0, "fd_ratio")["first_point_s"] is None  # never down to the floor
    assert claims.first_reach(points, 3.0, "fd_ratio")["at_first_point"]

    def curve(*triples):  # (seconds, captions right, FD / floor)
        return {"batch": 1, "curve": [{"seconds": s, "budget_s": s, "steps": 1, "caption": c, "object": c,
                                       "fd_ratio": fd} for s, c, fd in triples]}

    # the pixel model never follows a caption (0 of 256), but its FD falls: FD / floor is the level left to compare
    result = {"device": "test", "gpu": "test", "n": 256, "guidance": 3.0, "sampler": "x", "feature_network": "judge",
              "spaces": {"pixel": curve((60, 0.0, 3.0), (240, 0.0, 2.0)),
                         "latent": curve((15, 0.0, 4.0), (30, 0.1, 1.5), (60, 0.5, 1.1))}}
    done = claims.finish_latent_vs_pixel(result, tmp_path)
    assert "latent_over_pixel_time" not in done and not done["targets"]["caption"]["usable"]
    fd = done["targets"]["fd_ratio"]
    assert fd["usable"] and fd["target"] == 2.0
    assert fd["latent_over_pixel_time"] == pytest.approx((15 + 15 * 2.0 / 2.5) / 240)  # 4.0 -> 1.5: 80% of the way


def test_a_curve_is_saved_as_it_grows_and_a_cut_short_one_says_so(tmp_path):
    info = {"device": "test", "gpu": "test", "fast": False, "n": 256, "guidance": 3.0, "sampler": "x",
            "feature_network": "judge", "curve_s": [15, 30]}
    path = tmp_path / "claims_latent_vs_pixel.json"
    point = {"seconds": 15.2, "budget_s": 15, "steps": 50, "caption": 0.0, "object": 0.0, "fd_ratio": 3.0}
    claims.save_as_it_grows(path, "spaces", "pixel", {"batch": 32}, info)([point])  # the command stops here (time limit)
    saved = json.loads(path.read_text())
    assert saved["spaces"]["pixel"] == {"batch": 32, "curve": [point], "finished": False}
    assert "pixel: cut short after 15 s" in claims.table_latent_vs_pixel(saved)
    claims.merged(path, "spaces", {"pixel": {"batch": 32, "curve": [point], "finished": True}}, info)
    assert "cut short" not in claims.table_latent_vs_pixel(json.loads(path.read_text()))


def test_resume_goes_on_from_the_checkpoint_and_keeps_the_earlier_points(tmp_path, course_home, monkeypatch):
    monkeypatch.setenv("MINILDM_HOME", str(course_home))
    common = ["latent-vs-pixel", "--spaces", "pixel", "--fast", "--out", str(tmp_path), "-n", "4", "--steps", "2"]
    claims.main([*common, "--curve", "0.5"])
    first = json.loads((tmp_path / "claims_latent_vs_pixel.json").read_text())["spaces"]["pixel"]["curve"]
    later = round(first[0]["seconds"] + 2, 1)  # a budget past what the first command trained (10 steps: seconds)
    claims.main([*common, "--curve", "0.5", str(later), "--resume"])  # only the later budget is new
    curve = json.loads((tmp_path / "claims_latent_vs_pixel.json").read_text())["spaces"]["pixel"]["curve"]
    assert curve[0] == first[0] and [p["budget_s"] for p in curve] == [0.5, later]
    history = load_checkpoint(tmp_path / "claims_pixel.pt")["history"]  # went on: the first point is in its past
    assert any(h["step"] == first[0]["steps"] and h["seconds"] == first[0]["seconds"] for h in history)
    assert curve[1]["steps"] > curve[0]["steps"]
    (tmp_path / "claims_pixel.pt").unlink()  # e.g. a new machine: nothing to go on from
    with pytest.raises(SystemExit, match="no checkpoint .* run without --resume"):
        claims.main([*common, "--curve", str(later + 5), "--resume"])


def test_resume_refuses_a_checkpoint_that_did_not_make_the_last_point(tmp_path):
    ckpt = tmp_path / "claims_pixel.pt"
    save_checkpoint(ckpt, {"history": [{"step": 10, "seconds": 1.5}, {"step": 20, "seconds": 3.1}]})
    claims.check_resumable(ckpt, {"steps": 20, "seconds": 3.1}, "pixel")  # its own last point: goes on
    with pytest.raises(SystemExit, match="not the checkpoint of pixel's last point"):
        claims.check_resumable(ckpt, {"steps": 1530, "seconds": 241.3}, "pixel")  # another run's points


def test_a_command_stopped_mid_curve_has_saved_its_first_points(tmp_path, course_home, monkeypatch):
    monkeypatch.setenv("MINILDM_HOME", str(course_home))
    calls, train = [], claims.train_diffusion

    def stopped_at_the_second_budget(*args, **kwargs):  # as the device's time limit would stop it
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return train(*args, **kwargs)

    monkeypatch.setattr(claims, "train_diffusion", stopped_at_the_second_budget)
    with pytest.raises(KeyboardInterrupt):
        claims.main(["latent-vs-pixel", "--spaces", "pixel", "--fast", "--out", str(tmp_path), "-n", "4", "--steps",
                     "2", "--curve", "0.5", "600"])
    saved = json.loads((tmp_path / "claims_latent_vs_pixel.json").read_text())
    assert saved["spaces"]["pixel"]["finished"] is False and len(saved["spaces"]["pixel"]["curve"]) == 1
    assert "pixel: cut short" in claims.table_latent_vs_pixel(saved)


def test_no_ratio_from_a_cut_short_or_first_point_pixel_time_and_at_most_from_a_first_point_latent_time(tmp_path):
    def curve(*pairs, finished=True):  # (seconds, FD / floor)
        return {"batch": 1, "finished": finished,
                "curve": [{"seconds": s, "budget_s": s, "steps": 1, "caption": 0.0, "object": 0.0, "fd_ratio": fd}
                          for s, fd in pairs]}

    base = {"device": "test", "gpu": "test", "n": 256, "guidance": 3.0, "sampler": "x", "feature_network": "judge"}
    fd = claims.finish_latent_vs_pixel(
        {**base, "spaces": {"pixel": curve((60, 3.0), (240, 2.0)), "latent": curve((15, 1.5))}}, tmp_path)
    fd = fd["targets"]["fd_ratio"]
    assert fd["latent_over_pixel_time"] == pytest.approx(15 / 240) and fd["at_most"]  # latent there by 15 s or sooner
    for pixel, why in ((curve((60, 3.0), (240, 2.0), finished=False), "cut short"),
                       (curve((240, 2.0)), "first point")):
        done = claims.finish_latent_vs_pixel({**base, "spaces": {"pixel": pixel, "latent": curve((15, 1.5))}},
                                             tmp_path)
        assert "latent_over_pixel_time" not in done["targets"]["fd_ratio"]
        assert why in done["targets"]["fd_ratio"]["no_ratio"]


def test_each_space_has_its_default_curve_and_curve_sets_them_all():
    from argparse import Namespace

    pixel, latent = (claims.curve_for(Namespace(curve=None), space, fast=False) for space in ("pixel", "latent"))
    # the pixel model is evaluated at every second the latent one is (equal time), then goes on: its final accuracy
    # must be a level the latent curve can be timed to, which it reaches only well past the latent model's budget
    assert pixel[: len(latent)] == latent and pixel[-1] > latent[-1] and pixel == sorted(pixel)
    f_study = claims.curve_for(Namespace(curve=None), "f-study", fast=False)
    assert f_study == sorted(f_study) and len(f_study) >= 3  # "quality vs training time": 3+ budgets
    given = Namespace(curve=[60, 30.0])
    assert all(claims.curve_for(given, run, fast=False) == [30.0, 60.0] for run in ("pixel", "latent", "f-study"))
    assert claims.curve_for(Namespace(curve=None), "pixel", fast=True) == [1.0, 2.0]


def test_each_space_trains_to_its_own_curve(tmp_path, course_home, monkeypatch):
    monkeypatch.setenv("MINILDM_HOME", str(course_home))  # the judge, shared with the other runs
    own = {"pixel": [0.5, 30.0], "latent": [0.5]}  # 30 s: past the first run, which overshoots 0.5 s by < 10 steps
    monkeypatch.setattr(claims, "curve_for", lambda args, run, fast: own[run])
    claims.main(["latent-vs-pixel", "--fast", "--out", str(tmp_path), "-n", "4", "--steps", "2"])
    result = json.loads((tmp_path / "claims_latent_vs_pixel.json").read_text())
    assert result["curve_s"] == [0.5, 30.0]  # the union: what any space was evaluated at
    budgets = {space: [p["budget_s"] for p in run["curve"]] for space, run in result["spaces"].items()}
    assert budgets == own
