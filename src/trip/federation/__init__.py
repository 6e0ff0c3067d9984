"""Federation: the client update, the server's aggregation and BMA, and the engines that run rounds."""
