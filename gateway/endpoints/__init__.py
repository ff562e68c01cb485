"""The gateway's own endpoints: health and readiness, the admin views, the OpenAPI document."""
