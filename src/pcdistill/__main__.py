from pcdistill.cli import main

raise SystemExit(main())
