from kvchat.cli import main

raise SystemExit(main())
