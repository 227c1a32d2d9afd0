from bigticket.cli import main

raise SystemExit(main())
