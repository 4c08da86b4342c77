"""The pieces of `emergence-ray tune` (the driver itself is `emergence_ray.tune`): the validated
`tune:` section and its search space (`space`), searchers and schedulers (`search`), the report
bridge from a trial's Train run to Tune and PBT's checkpoint hand-over (`bridge`, `exploit`), and
the sweep's tables and figure (`results`)."""
