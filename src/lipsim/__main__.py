from lipsim.cli import main

raise SystemExit(main())
