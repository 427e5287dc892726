from services.estimator.cli import main

main()
