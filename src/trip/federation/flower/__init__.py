"""trip on Flower (flwr 1.42): a ServerApp and a ClientApp that run the same rounds as the in-process engine
(same client seeds, same aggregation order, so the same numbers on CPU), a warm ClientApp executor that keeps
the frozen CLIP in memory between messages, a local loopback federation for `trip run --engine flower`, and
the tools for a real deployment (certificates, node keys, run configs). See docs/deploy.md."""
