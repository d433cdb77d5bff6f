from atomicfs.cli import main

raise SystemExit(main())
