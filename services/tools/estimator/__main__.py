from services.tools.estimator.cli import main

main()
