"""What operators see: Prometheus metrics, the access log, the metrics port."""
