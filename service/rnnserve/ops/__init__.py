"""Operations: configuration (every flag and RNNSERVE_* variable), logging, Prometheus metrics
and their HTTP endpoint, CPU counting and port checks. Imports nothing of rnnserve's but
errors."""
