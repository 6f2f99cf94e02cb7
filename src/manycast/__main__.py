from manycast.cli import main

main()
