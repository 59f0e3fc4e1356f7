from kvchat.ui.warm import main

raise SystemExit(main())
