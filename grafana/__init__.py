"""Grafana dashboards built from code (see boards.py) and their provisioning files."""
