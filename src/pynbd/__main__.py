from pynbd.cli import main

raise SystemExit(main())
