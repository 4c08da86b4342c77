from emergence_ray.cli import main

raise SystemExit(main())
