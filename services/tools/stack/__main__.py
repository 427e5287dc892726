from services.tools.stack.cli import main

main()
