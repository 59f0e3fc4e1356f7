from kvchat.ui.warm import end_process, main

end_process(main())
