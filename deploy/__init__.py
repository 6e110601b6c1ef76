"""Deployment artefacts; `python -m deploy.generate` writes the Kubernetes resources derived from code."""
