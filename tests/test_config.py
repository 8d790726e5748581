"""Training configuration: paper defaults, YAML, overrides, errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from noisyseg.config import TrainConfig, build_config, config_from_dict

REQUIRED = ["data=/data", "out=/run"]


def test_defaults_are_the_papers_values() -> None:
    config = TrainConfig()
    assert (config.adele.lam, config.adele.rho, config.adele.r, config.adele.tau) == (1.0, 0.8, 0.9, 0.7)
    assert config.adele.scales == [1.0, 0.7, 1.5]
    assert (
        config.adele.correction_timing == "auto"
        and config.correction_timing() == "iteration"
        and config.adele.correction_every == 1
    )
    assert config.adele.correction_prediction == "multiscale" and config.adele.refuse_absent_classes
    assert config.arm.warmup_fraction == 0.05
    assert (config.loss.gce_q, config.loss.ohem_threshold) == (0.7, 0.7)
    assert (config.optim.lr, config.batch_size, config.epochs) == (0.01, 5, 100)


def test_yaml_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "method: arm\nepochs: 7\nadele: {r: 0.8, tau: 0.75}\nmodel: "
        "{architecture: unet, kwargs: {base_width: 8, depth: 3}}\n",
        encoding="utf-8",
    )
    config = build_config(path, [*REQUIRED, "adele.r=0.5", "model.kwargs.base_width=4", "adele.scales=[1.0, 0.5]"])
    assert config.method == "arm" and config.epochs == 7
    assert config.adele.r == 0.5  # override beats the file
    assert config.adele.tau == 0.75  # file beats the default
    assert config.model.kwargs == {"base_width": 4, "depth": 3}  # one constructor argument changed
    assert config.adele.scales == [1.0, 0.5]


def test_unknown_keys_are_errors_naming_them(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"adele\.rr"):
        build_config(None, [*REQUIRED, "adele.rr=0.5"])
    path = tmp_path / "bad.yaml"
    path.write_text("epochz: 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match="epochz"):
        build_config(path, REQUIRED)


def test_wrong_types_and_values_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"'adele\.tau': expected float"):
        build_config(None, [*REQUIRED, "adele.tau=high"])
    with pytest.raises(ValueError, match="'epochs': expected int"):
        build_config(None, [*REQUIRED, "epochs=2.5"])
    with pytest.raises(ValueError, match="'method'"):
        build_config(None, [*REQUIRED, "method=magic"])
    with pytest.raises(ValueError, match=r"'adele\.r'"):
        build_config(None, [*REQUIRED, "adele.r=1.5"])
    with pytest.raises(ValueError, match=r"'adele\.scales'"):
        build_config(None, [*REQUIRED, "adele.scales=[0.7, 1.5]"])
    with pytest.raises(ValueError, match=r"'adele\.fit_weights': expected 'equal' or 'reference', got 'late'"):
        build_config(None, [*REQUIRED, "adele.fit_weights=late"])
    assert build_config(None, [*REQUIRED, "adele.fit_weights=reference"]).adele.fit_weights == "reference"
    with pytest.raises(ValueError, match="KEY=VALUE"):
        build_config(None, [*REQUIRED, "adele.r"])


def test_bad_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("adele: {r: [\n", encoding="utf-8")
    with pytest.raises(ValueError, match="broken.yaml"):
        build_config(path, REQUIRED)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        build_config(tmp_path / "missing.yaml", REQUIRED)


def test_semantic_hash_ignores_only_resumable_fields() -> None:
    base = config_from_dict({"data": "/d", "out": "/a"})
    same = config_from_dict({"data": "/d", "out": "/b", "epochs": 3, "quiet": True})
    different = config_from_dict({"data": "/d", "out": "/a", "adele": {"tau": 0.8}})
    assert base.semantic_hash() == same.semantic_hash()
    assert base.semantic_hash() != different.semantic_hash()


def test_round_trip_through_dict() -> None:
    config = build_config(None, [*REQUIRED, "arm.momentum=0.5", "labels=/noisy"])
    assert config_from_dict(config.to_dict()) == config


def test_exponent_notation_reads_as_a_float() -> None:
    # YAML 1.1 reads 1e-6 (no dot) as a string; a float field takes it as the number it is.
    config = build_config(None, [*REQUIRED, "optim.lr=1e-6", "adele.tau=7E-1"])
    assert config.optim.lr == 1e-6 and config.adele.tau == 0.7
