"""Two Ray nodes with different pool resources: drafter and verifier land apart, output stays exact.

A local ``ray.cluster_utils.Cluster``: a head node without pool resources and
two worker nodes advertising ``drafter_pool`` and ``verifier_pool``. The app's
``drafter_pool`` / ``verifier_pool`` settings pin the Drafter and Verifier
replicas to them, so every draft tree crosses nodes as a Ray object.
"""

from __future__ import annotations

import httpx
import pytest

from conftest import random_prompts
from serve_utils import free_port, reference_engine, run_app, save_tiny_models, start_serve, tiny_config

pytestmark = [pytest.mark.serve, pytest.mark.timeout(420)]

NEW = 20


@pytest.fixture(scope="module")
def cluster_app(tmp_path_factory: pytest.TempPathFactory):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from services.app import build_app
    from services.config import AppConfig

    target, drafter = save_tiny_models(tmp_path_factory.mktemp("models"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    nodes = {
        "drafter_pool": cluster.add_node(num_cpus=1, resources={"drafter_pool": 1}),
        "verifier_pool": cluster.add_node(num_cpus=1, resources={"verifier_pool": 1}),
    }
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        http_port = free_port()
        start_serve(http_port, None, proxy_location="HeadOnly")
        config = tiny_config(target, drafter, drafter_pool="drafter_pool", verifier_pool="verifier_pool", pool_resource_per_replica=1)
        run_app(build_app(AppConfig.model_validate(config)))
        yield f"http://127.0.0.1:{http_port}", reference_engine(target, drafter), {k: n.node_id for k, n in nodes.items()}
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def test_pools_on_their_nodes_and_output_exact(cluster_app) -> None:
    from ray import serve

    base, engine, node_ids = cluster_app
    (drafter,) = serve.get_deployment_handle("Drafter", app_name="cast").broadcast("debug_state").results()
    (verifier,) = serve.get_deployment_handle("Verifier", app_name="cast").broadcast("debug_state").results()
    assert drafter["node_id"] == node_ids["drafter_pool"]
    assert verifier["node_id"] == node_ids["verifier_pool"]

    prompts = random_prompts(3, seed=31)
    expected = engine.generate(prompts, max_new_tokens=NEW)
    for prompt, gen in zip(prompts, expected):
        r = httpx.post(base + "/v1/completions", json={"prompt": prompt, "max_tokens": NEW}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == gen.text
        assert r.json()["cast"]["steps"] >= 1
    (verifier,) = serve.get_deployment_handle("Verifier", app_name="cast").broadcast("debug_state").results()
    assert verifier["tree_unpickles"] > 0
    assert serve.get_deployment_handle("Router", app_name="cast").debug_state.remote().result()["tree_unpickles"] == 0
