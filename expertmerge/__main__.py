from expertmerge.cli import main

raise SystemExit(main())
