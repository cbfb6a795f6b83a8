"""Governance rules for .github/workflows: triggers, permissions, secrets, pinning."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO_ROOT / ".github" / "workflows"
SHA_PIN = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_./-]+@[0-9a-f]{40}$")
UNTRUSTED_IN_RUN = re.compile(
    r"\$\{\{\s*(inputs\.|github\.event\.|github\.head_ref|github\.ref_name|github\.ref\b)"
)
SECRET_REF = re.compile(r"\bsecrets\.")


def load(name: str) -> dict[str, Any]:
    text = (WORKFLOWS / name).read_text()
    document = yaml.safe_load(text)
    assert isinstance(document, dict)
    # PyYAML reads the bare key `on` as the boolean True.
    if True in document:
        document["on"] = document.pop(True)
    return document


def all_workflows() -> list[str]:
    return sorted(path.name for path in WORKFLOWS.glob("*.y*ml"))


def steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list(job.get("steps", []))


@pytest.fixture(scope="module")
def ci() -> dict[str, Any]:
    return load("ci.yml")


@pytest.fixture(scope="module")
def deploy() -> dict[str, Any]:
    return load("deploy.yml")


def test_ci_runs_on_pull_requests_pushes_and_calls(ci: dict[str, Any]) -> None:
    triggers = ci["on"]
    assert "pull_request" in triggers
    assert set(triggers["push"]["branches"]) == {"main", "develop"}
    assert "workflow_call" in triggers


def test_ci_is_read_only_and_uses_no_secrets(ci: dict[str, Any]) -> None:
    assert ci["permissions"] == {"contents": "read"}
    for job in ci["jobs"].values():
        assert job.get("permissions", {"contents": "read"}) == {"contents": "read"}
    assert not SECRET_REF.search((WORKFLOWS / "ci.yml").read_text())


def test_ci_has_every_gate(ci: dict[str, Any]) -> None:
    commands = "\n".join(
        str(step.get("run", "")) + str(step.get("uses", ""))
        for job in ci["jobs"].values()
        for step in steps(job)
    )
    for needle in (
        "ruff format --check",
        "ruff check",
        "mypy",
        "pytest --cov",
        "redis-server",
        "bandit",
        "pip-audit",
        "actionlint",
        "check_delivery.sh --static",
        "docker/build-push-action@",
        "aquasecurity/trivy-action@",
        "anchore/sbom-action@",
    ):
        assert needle in commands, needle


def test_trivy_fails_on_fixable_high_and_critical(
    ci: dict[str, Any], deploy: dict[str, Any]
) -> None:
    scans = [
        step["with"]
        for workflow in (ci, deploy)
        for job in workflow["jobs"].values()
        for step in steps(job)
        if str(step.get("uses", "")).startswith("aquasecurity/trivy-action@")
    ]
    assert len(scans) == 2
    for scan in scans:
        assert scan["severity"] == "HIGH,CRITICAL"
        assert scan["ignore-unfixed"] is True
        assert str(scan["exit-code"]) == "1"


def test_ci_docker_build_uses_buildx_gha_cache_and_does_not_push(ci: dict[str, Any]) -> None:
    builds = [
        step["with"]
        for step in steps(ci["jobs"]["docker"])
        if str(step.get("uses", "")).startswith("docker/build-push-action@")
    ]
    assert builds
    platforms = {build["platforms"] for build in builds}
    assert platforms == {"linux/amd64", "linux/arm64"}
    for build in builds:
        assert build["push"] is False
        assert "type=gha" in build["cache-from"]


def test_deploy_runs_only_for_trusted_refs(deploy: dict[str, Any]) -> None:
    triggers = deploy["on"]
    assert set(triggers) == {"push", "workflow_dispatch"}
    assert set(triggers["push"]["branches"]) == {"main", "develop"}
    assert triggers["push"]["tags"] == ["v*"]
    assert "git_sha" in triggers["workflow_dispatch"]["inputs"]


@pytest.mark.parametrize("name", all_workflows())
def test_no_workflow_uses_pull_request_target(name: str) -> None:
    assert "pull_request_target" not in (WORKFLOWS / name).read_text()
    assert "pull_request_target" not in load(name)["on"]


def test_deploy_token_has_no_default_permissions(deploy: dict[str, Any]) -> None:
    assert deploy["permissions"] == {}
    for name, job in deploy["jobs"].items():
        assert "permissions" in job, f"job {name} must declare its permissions"


def test_only_the_build_job_can_write_packages_or_mint_oidc_tokens(deploy: dict[str, Any]) -> None:
    for name, job in deploy["jobs"].items():
        permissions = job["permissions"]
        writes = {scope for scope, level in permissions.items() if level == "write"}
        if name == "build":
            assert writes == {"packages", "id-token"}
        else:
            assert writes == set(), f"{name} must be read-only"


def test_environments_map_develop_to_staging_and_main_to_production(
    deploy: dict[str, Any],
) -> None:
    jobs = deploy["jobs"]
    assert jobs["deploy-production"]["environment"]["name"] == "production"
    assert jobs["deploy-staging"]["environment"]["name"] == "staging"
    assert "'production'" in jobs["deploy-production"]["if"]
    assert "'staging'" in jobs["deploy-staging"]["if"]
    resolve_script = next(s["run"] for s in steps(jobs["resolve"]) if s.get("id") == "resolve")
    assert re.search(r"refs/heads/main\)\s*environment=production", resolve_script)
    assert re.search(r"refs/heads/develop\)\s*environment=staging", resolve_script)


def test_deploys_never_cancel_each_other(deploy: dict[str, Any]) -> None:
    for name in ("deploy-staging", "deploy-production"):
        concurrency = deploy["jobs"][name]["concurrency"]
        assert concurrency["cancel-in-progress"] is False
        assert name.split("-")[1] in concurrency["group"]
    assert deploy["concurrency"]["cancel-in-progress"] is False


def test_secrets_are_referenced_only_in_deploy_jobs(deploy: dict[str, Any]) -> None:
    for name, job in deploy["jobs"].items():
        mentions = SECRET_REF.findall(yaml.safe_dump(job))
        if name.startswith("deploy-"):
            assert mentions, f"{name} should read its environment's secrets"
            assert "environment" in job
        else:
            assert not mentions, f"{name} must not reference secrets"


def test_deploy_reruns_ci_gates_before_building(deploy: dict[str, Any]) -> None:
    jobs = deploy["jobs"]
    assert jobs["ci"]["uses"] == "./.github/workflows/ci.yml"
    assert "ci" in jobs["build"]["needs"]
    for name in ("deploy-staging", "deploy-production"):
        assert "build" in jobs[name]["needs"]


def test_image_is_tagged_with_the_commit_sha_and_deployed_by_digest(
    deploy: dict[str, Any],
) -> None:
    jobs = deploy["jobs"]
    resolve_env = next(s["env"] for s in steps(jobs["resolve"]) if s.get("id") == "resolve")
    assert resolve_env["PUSHED_SHA"] == "${{ github.sha }}"
    meta = next(s for s in steps(jobs["build"]) if s.get("id") == "meta")
    assert "type=raw,value=${{ needs.resolve.outputs.sha }}" in meta["with"]["tags"]
    assert "type=semver" not in meta["with"]["tags"]  # release tags only after scan and signing
    build = next(s for s in steps(jobs["build"]) if s.get("id") == "build")
    assert build["with"]["platforms"] == "linux/amd64,linux/arm64"
    assert build["with"]["push"] is True
    assert "GIT_SHA=${{ needs.resolve.outputs.sha }}" in build["with"]["build-args"]
    ref_step = next(s for s in steps(jobs["build"]) if s.get("id") == "ref")
    assert "${IMAGE}:${GIT_SHA}@${DIGEST}" in ref_step["run"]
    for name in ("deploy-staging", "deploy-production"):
        deploy_step = next(s for s in steps(jobs[name]) if "deploy_quantum.py" in s.get("run", ""))
        assert deploy_step["env"]["APP_IMAGE"] == "${{ needs.build.outputs.image_ref }}"
        assert deploy_step["env"]["EXPECTED_VERSION"] == "${{ needs.resolve.outputs.sha }}"


def test_release_tags_are_pushed_only_after_scan_and_signing(deploy: dict[str, Any]) -> None:
    build_steps = steps(deploy["jobs"]["build"])
    names = [str(s.get("name", s.get("uses", ""))) for s in build_steps]
    release = next(s for s in build_steps if s.get("id") == "release")
    assert "type=semver,pattern={{version}}" in release["with"]["tags"]
    tagging = next(i for i, s in enumerate(build_steps) if "imagetools create" in s.get("run", ""))
    assert build_steps[tagging]["env"]["RELEASE_TAGS"] == "${{ steps.release.outputs.tags }}"
    scan = next(i for i, n in enumerate(names) if n.startswith("Trivy scan"))
    sign = next(i for i, s in enumerate(build_steps) if "cosign sign" in s.get("run", ""))
    attest = next(i for i, s in enumerate(build_steps) if "cosign attest" in s.get("run", ""))
    assert tagging > max(scan, sign, attest)


def test_image_is_signed_and_its_sbom_attested(deploy: dict[str, Any]) -> None:
    runs = "\n".join(str(s.get("run", "")) for s in steps(deploy["jobs"]["build"]))
    assert "cosign sign --yes" in runs
    assert "cosign attest --yes --type spdxjson" in runs


def test_rendered_files_are_deleted_at_the_end(deploy: dict[str, Any]) -> None:
    for name in ("deploy-staging", "deploy-production"):
        last = steps(deploy["jobs"][name])[-1]
        assert last["if"] == "always()"
        assert "rm -rf" in last["run"]


def test_notification_is_skipped_without_a_webhook(deploy: dict[str, Any]) -> None:
    for name in ("deploy-staging", "deploy-production"):
        job = deploy["jobs"][name]
        notify = next(s for s in steps(job) if str(s.get("name", "")).startswith("Notify"))
        assert "NOTIFY_CONFIGURED == 'true'" in notify["if"]
        assert "!= ''" in job["env"]["NOTIFY_CONFIGURED"]


@pytest.mark.parametrize("name", all_workflows())
def test_third_party_actions_are_pinned_to_full_commit_shas(name: str) -> None:
    document = load(name)
    for job in document["jobs"].values():
        uses = [job["uses"]] if "uses" in job else []
        uses += [step["uses"] for step in steps(job) if "uses" in step]
        for reference in uses:
            if reference.startswith("./"):
                continue
            assert SHA_PIN.match(reference), f"{name}: {reference} is not pinned to a commit SHA"


@pytest.mark.parametrize("name", all_workflows())
def test_checkouts_do_not_persist_credentials(name: str) -> None:
    for job in load(name)["jobs"].values():
        for step in steps(job):
            if str(step.get("uses", "")).startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False


@pytest.mark.parametrize("name", all_workflows())
def test_untrusted_values_never_expand_inside_run_scripts(name: str) -> None:
    for job in load(name)["jobs"].values():
        for step in steps(job):
            assert not UNTRUSTED_IN_RUN.search(str(step.get("run", ""))), step.get("name")
