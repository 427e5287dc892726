from services.http_front.app import main

main()
