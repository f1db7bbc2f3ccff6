"""deploy/kubernetes/ against the Kubernetes schemas (kubernetes-validate, strict: unknown fields refused), and
against this repository: the command is a valid `dspark-trt serve`, ports, probes, selectors and the autoscaled
metric all name things that exist. No cluster is needed (and none was used)."""
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from dspark_trt.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
VERSIONS = ("1.29", "1.33", kubernetes_validate.latest_version())  # a range of clusters still in use


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / "deploy" / "kubernetes" / name).read_text())


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_each_manifest_is_valid_against_the_kubernetes_schema(path, version):
    for resource in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(resource, version, strict=True)


def test_the_validator_refuses_a_broken_manifest():
    deployment = load("deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] = ["/v2"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)
    deployment = load("deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_the_deployment_runs_serve_on_the_ports_its_probes_service_and_scrape_use():
    deployment, service, hpa = load("deployment.yaml"), load("service.yaml"), load("hpa.yaml")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    command = container["command"]
    assert command[:2] == ["dspark-trt", "serve"]
    args = build_parser().parse_args(command[1:])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port,
                     "supervisor": args.supervisor_port}
    assert args.address == "0.0.0.0" and args.repo  # reachable from the Service; a packaged repository
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/live", "port": "supervisor"}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(args.supervisor_port)
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": deployment["apiVersion"], "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    bls_model = (ROOT / "triton_repo" / "dspark_bls" / "1" / "model.py").read_text()
    assert metric.startswith("dspark_") and f'"{metric.removeprefix("dspark_")}"' in bls_model  # a series it exports
