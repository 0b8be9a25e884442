"""Publishing a bundle: local staging without a token, and the real huggingface_hub client against
a loopback fake Hub (tests/fake_hub.py) for upload, read-back verification and error handling."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
import traceback
from pathlib import Path

import pytest
import torch
import yaml

from core.config import load_params
from models.codec import CodecConfig, TeluCodec
from models.s2s_transformer import S2SConfig, S2STransformer
from serving.bundle import export_bundle, load_bundle
from tasks.release.hub import redact
from tasks.release.hub_repos import hub_endpoint
from tasks.release.publish import publish_bundle
from tasks.release.staging import PublishError, read_sums, stage_repos, verify_folder
from tests.fake_hub import FakeHub

TOKEN = "test-token-7f3a9c2e51"             # not shaped like an hf_ token: redaction must find it by value
WRONG = "wrong-token-0b8d44e6a1"
FILES = {"codec": {"codec.pt", "config.json", "bundle.json", "README.md", "SHA256SUMS"},
         "s2s": {"s2s.pt", "config.json", "bundle.json", "README.md", "SHA256SUMS"}}
META = {
    "model_name": "telugu-s2s", "version": "3", "profile": "smoke", "git_commit": "0123abcd",
    "corpus_hash": "5d41402abc4b2a76b9719d911017c592.dir",
    "corpus": {"hash": "5d41402abc4b2a76b9719d911017c592.dir", "kept_hours": 0.05, "pairs": 12},
    "metrics": {"codec": {"snr_db": 1.25, "stoi": 0.61}, "s2s": {"cross_entropy": 3.2, "perplexity": 24.53},
                "latency": {"first_audio_mean_ms": 81.5, "first_audio_p95_ms": 99.0}},
    "gates": {"codec": {"name": "codec", "passed": True, "reason": "",
                        "checks": [{"metric": "stoi", "value": 0.61, "op": ">=", "threshold": 0.4, "note": "",
                                    "passed": True}]},
              "s2s": {"name": "s2s", "passed": True, "reason": "",
                      "checks": [{"metric": "perplexity", "value": 24.53, "op": "<=", "threshold": 100.0, "note": "",
                                  "passed": True}]}},
    "sources": {"codec": "/home/someone/artifacts/codec/last.pt", "s2s": "/home/someone/artifacts/s2s/last.pt"},
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, one_thread) -> Path:
    """A real bundle of a tiny codec and a tiny S2S model, exported by serving.bundle."""
    root = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    codec = TeluCodec(CodecConfig(channels=4, latent_dim=8, n_codebooks=2, codebook_size=16))
    s2s_config = S2SConfig(n_codebooks=2, codebook_size=16, d_model=16, n_layers=1, n_heads=2, max_len=64)
    s2s = S2STransformer(s2s_config)
    torch.save({"config": codec.config_dict(), "model": codec.state_dict()}, root / "codec.ckpt")
    torch.save({"config": dataclasses.asdict(s2s_config), "codec_config": codec.config_dict(),
                "model": s2s.state_dict()}, root / "s2s.ckpt")
    return export_bundle(root / "codec.ckpt", root / "s2s.ckpt", root / "bundle", META)


@pytest.fixture()
def hub_env(project_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Online huggingface_hub (conftest sets HF_HUB_OFFLINE=1, read into a constant at import),
    no HF_ENDPOINT from the caller's shell, no token unless a test sets one, and hf_xet's session
    logs (written when a session starts) in tmp rather than ~/.cache."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_XET_CACHE", str(tmp_path / "hf-home" / "xet"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def _params(endpoint: str | None = None, **publish):
    return load_params(overrides={"publish": {"endpoint": endpoint, **publish}})


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def _token_free(text: str, token: str) -> None:
    assert token not in text


# -- without a token -------------------------------------------------------------------------------


def test_no_token_stages_local_repos(bundle: Path, hub_env, tmp_path: Path) -> None:
    params = _params()
    out = params.path(params.publish.out_dir)
    report = publish_bundle(bundle, params.publish, out)

    assert report.mode == "local" and not report.verified and report.transport is None
    assert "HF_TOKEN" in report.message and "not set" in report.message and str(out) in report.message
    for kind, folder in (("codec", out / "codec"), ("s2s", out / "s2s")):
        assert {p.name for p in folder.iterdir()} == FILES[kind]
        check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=folder, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        assert set(read_sums(folder / "SHA256SUMS")) == FILES[kind] - {"SHA256SUMS"}
        card = (folder / "README.md").read_text()
        front = _front_matter(card)
        assert front["license"] == "apache-2.0" and front["language"] == ["te"]
        assert front["library_name"] == "pytorch" and "telugu" in front["tags"]
        for heading in ("## What it is", "## Evaluation", "## Training data", "## Limitations", "## Licence",
                        "## Usage"):
            assert heading in card
        assert "| s2s | perplexity | 24.53 | <= 100 | pass |" in card
        assert "| latency | first_audio_mean_ms | 81.5 |" in card
        assert META["corpus_hash"] in card and "espeak-ng" in card and "load_bundle" in card
        published_meta = json.loads((folder / "bundle.json").read_text())
        assert "sources" not in published_meta and published_meta["sha256"] == json.loads(
            (bundle / "bundle.json").read_text())["sha256"]
    weights = torch.load(bundle / "s2s.pt", weights_only=True)
    s2s_config = json.loads((out / "s2s" / "config.json").read_text())
    assert s2s_config == json.loads(json.dumps({**weights["config"], "codec_config": weights["codec_config"]}))
    assert (out / "codec" / "codec.pt").read_bytes() == (bundle / "codec.pt").read_bytes()

    written = json.loads((out / "publish.json").read_text())
    assert written == json.loads(json.dumps(dataclasses.asdict(report)))
    assert [r["kind"] for r in written["repos"]] == ["codec", "s2s"]

    # the usage in the model card: codec.pt from one repo, s2s.pt and bundle.json from the other
    assembled = tmp_path / "assembled"
    assembled.mkdir()
    shutil.copy(out / "codec" / "codec.pt", assembled)
    for name in ("s2s.pt", "bundle.json"):
        shutil.copy(out / "s2s" / name, assembled)
    assert load_bundle(assembled).meta["version"] == "3"


def test_staging_refuses_weights_that_do_not_match_bundle_json(bundle: Path, hub_env, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    data = bytearray((broken / "codec.pt").read_bytes())
    data[-1] ^= 0xFF
    (broken / "codec.pt").write_bytes(bytes(data))
    params = _params()
    with pytest.raises(PublishError, match="codec.pt does not match"):
        stage_repos(broken, params.publish, tmp_path / "out")
    assert not (tmp_path / "out" / "codec").exists()


def test_offline_mode_stays_local_even_with_a_token(bundle: Path, hub_env, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    params = _params("http://127.0.0.1:9")  # nothing listens there: any request would fail
    report = publish_bundle(bundle, params.publish, tmp_path / "out", token=TOKEN)
    assert report.mode == "local" and "HF_HUB_OFFLINE" in report.message
    _token_free((tmp_path / "out" / "publish.json").read_text(), TOKEN)


# -- with a token, against the fake Hub --------------------------------------------------------------


def test_publish_uploads_verifies_and_republishes(bundle: Path, hub_env, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub(TOKEN) as hub:
        params = _params(hub.url)
        out = params.path(params.publish.out_dir)
        report = publish_bundle(bundle, params.publish, out)

        assert report.mode == "hub" and report.verified and report.transport == "http"
        assert [r.repo_id for r in report.repos] == ["tester/telucodec", "tester/telugu-s2s"]
        for repo in report.repos:
            assert repo.verified and repo.private
            assert repo.url == f"{hub.url}/{repo.repo_id}"
            assert repo.commit == hub.repos[repo.repo_id].head.oid
            assert hub.repos[repo.repo_id].private
            on_hub = hub.files(repo.repo_id)
            assert set(on_hub) == FILES[repo.kind] | {".gitattributes"}
            for name in FILES[repo.kind]:
                assert on_hub[name] == (Path(repo.local_dir) / name).read_bytes()
            _front_matter(on_hub["README.md"].decode())
            assert f"{hub.url}/tester/" in on_hub["README.md"].decode()  # the cards link each other
        assert len(hub.calls("GET", "/api/whoami-v2")) == 1
        assert len(hub.calls("POST", "/commit/main")) == 2
        validations = hub.calls("POST", "/api/validate-yaml")  # the cards' front matter (twice per upload in 2.4.0)
        assert len(validations) >= 2 and all(r.status == 200 for r in validations)
        assert all(r.status == 404 for r in hub.calls("GET", "/xet-write-token/"))  # no Xet here: plain HTTP
        downloads = {r.path.rsplit("/", 1)[1] for r in hub.calls("GET", "/resolve/")}
        assert downloads == FILES["codec"] | FILES["s2s"]
        assert all(r.authorized for r in hub.requests if not r.path.startswith("/lfs-upload/"))
        assert "verified" in report.message and "tester/telucodec" in report.message
        written = (out / "publish.json").read_text()
        assert json.loads(written)["mode"] == "hub"
        _token_free(written, TOKEN)
        for folder in (out / "codec", out / "s2s"):
            for path in folder.iterdir():
                _token_free(path.read_text(errors="replace"), TOKEN)

        # the card's usage, against the Hub: the two repos make a loadable bundle
        from huggingface_hub import HfApi

        api = HfApi(endpoint=hub.url, token=TOKEN)
        folder = tmp_path / "from-hub"
        api.hf_hub_download("tester/telucodec", "codec.pt", local_dir=folder)
        for name in ("s2s.pt", "bundle.json"):
            api.hf_hub_download("tester/telugu-s2s", name, local_dir=folder)
        assert load_bundle(folder).meta["model_name"] == "telugu-s2s"

        # the same bundle again: repos reused (409 from create), nothing changed, so no new commit
        commits_before = {rid: len(repo.commits) for rid, repo in hub.repos.items()}
        again = publish_bundle(bundle, params.publish, out)
        assert again.mode == "hub" and again.verified
        assert [r.commit for r in again.repos] == [r.commit for r in report.repos]
        assert {rid: len(repo.commits) for rid, repo in hub.repos.items()} == commits_before
        assert [r.status for r in hub.calls("POST", "/api/repos/create")] == [200, 200, 409, 409]


def test_publish_through_lfs_when_the_server_offers_no_xet(bundle: Path, hub_env, monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    """hf_xet is installed and enabled, the server wants the weights as LFS but has no Xet storage:
    the upload must take the classic LFS route (batch + PUT) and still verify."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    with FakeHub(TOKEN, lfs_suffixes=(".pt",)) as hub:
        params = _params(hub.url, namespace="tester")
        report = publish_bundle(bundle, params.publish, tmp_path / "out", token=TOKEN)
        assert report.mode == "hub" and report.verified and report.transport == "http"
        assert len(hub.calls("POST", ".git/info/lfs/objects/batch")) == 2
        assert len(hub.calls("PUT", "/lfs-upload/")) == 2
        assert hub.repos["tester/telucodec"].head.files["codec.pt"].lfs
        assert hub.files("tester/telugu-s2s")["s2s.pt"] == (bundle / "s2s.pt").read_bytes()
    assert constants.HF_HUB_DISABLE_XET is False  # restored after the upload


def test_publish_takes_the_xet_pipeline_where_the_server_offers_xet(bundle: Path, hub_env,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    """The path the real Hub gets: a Xet write token is on offer, so upload_folder runs huggingface_hub's
    pipelined uploader (here every file is "regular", so no bytes go to the non-existent CAS)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    with FakeHub(TOKEN, offer_xet=True) as hub:
        params = _params(hub.url)
        report = publish_bundle(bundle, params.publish, tmp_path / "out", token=TOKEN)
        assert report.mode == "hub" and report.verified and report.transport == "xet"
        assert [r.status for r in hub.calls("GET", "/xet-write-token/")] == [200]
        assert len(hub.calls("POST", "/commit/main")) == 2
        assert hub.files("tester/telucodec")["codec.pt"] == (bundle / "codec.pt").read_bytes()


def test_wrong_token_is_a_clear_error_with_the_token_redacted(bundle: Path, hub_env, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    monkeypatch.setenv("HF_TOKEN", WRONG)
    caplog.set_level(logging.DEBUG)
    logging.getLogger("huggingface_hub").setLevel(logging.DEBUG)
    try:
        with FakeHub(TOKEN, echo_token_in_errors=True) as hub:
            # the careless server quotes the token back: unwrapped, huggingface_hub's error carries it
            with pytest.raises(HfHubHTTPError) as raw:
                HfApi(endpoint=hub.url, token=WRONG).whoami()
            assert WRONG in "".join(traceback.format_exception(raw.value))
            assert WRONG in caplog.text  # and httpcore's DEBUG log of the response headers
            caplog.clear()

            params = _params(hub.url)
            with pytest.raises(PublishError) as failure:
                publish_bundle(bundle, params.publish, tmp_path / "out")
    finally:
        logging.getLogger("huggingface_hub").setLevel(logging.WARNING)

    message = str(failure.value)
    assert failure.value.status_code == 401
    assert "HF_TOKEN" in message and "401" in message and "Invalid" in message and "***" in message
    _token_free(message, WRONG)
    _token_free("".join(traceback.format_exception(failure.value)), WRONG)
    _token_free(caplog.text, WRONG)
    assert hub.requests[-1].status == 401 and not hub.requests[-1].authorized
    assert not hub.repos  # nothing was created with a refused token
    written = json.loads((tmp_path / "out" / "publish.json").read_text())
    assert written["mode"] == "failed" and not written["verified"]
    _token_free(json.dumps(written), WRONG)


def test_corrupted_download_fails_verification_naming_the_file(bundle: Path, hub_env, tmp_path: Path) -> None:
    with FakeHub(TOKEN) as hub:
        hub.corrupt.add(("tester/telucodec", "codec.pt"))
        params = _params(hub.url)
        with pytest.raises(PublishError, match=r"tester/telucodec@\w+: downloaded back, codec\.pt \(sha256"):
            publish_bundle(bundle, params.publish, tmp_path / "out", token=TOKEN)
        assert hub.files("tester/telucodec")["codec.pt"] == (bundle / "codec.pt").read_bytes()  # upload was fine
    written = json.loads((tmp_path / "out" / "publish.json").read_text())
    assert written["mode"] == "failed" and "codec.pt" in written["message"]
    assert verify_folder(tmp_path / "out" / "codec")  # the local copy itself is intact


def test_existing_public_repo_is_refused_while_private_is_set(bundle: Path, hub_env, tmp_path: Path) -> None:
    with FakeHub(TOKEN) as hub:
        hub._create_repo("tester/telucodec", private=False)
        params = _params(hub.url)
        with pytest.raises(PublishError, match="tester/telucodec already exists and is public"):
            publish_bundle(bundle, params.publish, tmp_path / "out", token=TOKEN)
        assert not hub.calls("POST", "/commit/")


def test_redact_hides_the_token_and_credential_shapes() -> None:
    text = redact(f"401 for {TOKEN}; Authorization: Bearer abc.def; leaked hf_AbCdEfGhIjKlMnOp", TOKEN)
    assert TOKEN not in text and "abc.def" not in text and "hf_AbCd" not in text
    assert text.count("***") == 3 and text.startswith("401 for ***")


def test_endpoint_precedence(hub_env, monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_ENDPOINT wins over publish.endpoint, which wins over the public Hub (params.yaml's order)."""
    from tasks.release.hub_repos import DEFAULT_ENDPOINT

    assert hub_endpoint(_params().publish) == DEFAULT_ENDPOINT  # the public Hub (never contacted here)
    assert hub_endpoint(_params("http://hub.internal:8080/").publish) == "http://hub.internal:8080"
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.internal")
    assert hub_endpoint(_params("http://hub.internal:8080").publish) == "http://mirror.internal"
