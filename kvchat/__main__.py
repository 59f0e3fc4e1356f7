from kvchat.ui.cli import main

raise SystemExit(main())
