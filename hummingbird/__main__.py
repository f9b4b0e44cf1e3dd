from hummingbird.cli import main

raise SystemExit(main())
